"""The per-bin forecast on synthetic series: rhythm, noise, gaps, pickups, persistence."""
import hashlib
import json
import math
import pathlib
import random

import pytest
from hypothesis import example, given, settings, strategies as st

from binlink.gateway import forecast
from binlink.gateway.forecast import BinForecast, ForecastStore
from tests.vectors import make_forecast_vectors as vectors

HOUR = 3600.0
DAY = 86400.0
START = 1_790_208_000.0  # 2026-09-24 00:00 UTC, a Thursday


def rate(t, per_day):
    """% per hour: quiet nights, busy afternoons, 1.3x at weekends (mean ~per_day / 24)."""
    hour = (t % DAY) / HOUR
    daily = 0.25 + 1.5 * max(0.0, math.sin(math.pi * (hour - 7) / 14)) if 7 <= hour <= 21 else 0.25
    weekly = 1.3 if int(t // DAY + 3) % 7 >= 5 else 1.0
    return per_day / 24.0 * daily * weekly / 0.876


def series(days, per_day=30.0, noise=0.5, p_missing=0.0, seed=1, start_fill=5.0, start=START):
    """(t, fill) hourly readings of a bin that is never emptied (fill may pass 100)."""
    rng = random.Random(seed)
    t, fill, out = start, start_fill, []
    while t < start + days * DAY:
        for _ in range(6):
            fill += rate(t, per_day) / 6
            t += HOUR / 6
        if rng.random() >= p_missing:
            out.append((t, fill + rng.gauss(0, noise)))
    return out


def true_time_of(level, per_day, start_t, start_fill):
    t, fill = start_t, start_fill
    while fill < level:
        fill += rate(t, per_day) / 60
        t += 60.0
    return t


def learn(f, readings, until=None):
    for t, fill in readings:
        if until is not None and t > until:
            break
        f.update(t, max(0.0, min(100.0, fill)))
    return f


def test_learns_the_fill_rate_and_forecasts_the_full_time_a_day_ahead():
    """Three weeks of learning (seven fill cycles), then a bin at 40 %: full_at within two hours."""
    f = BinForecast()
    for cycle in range(7):  # filled and emptied seven times
        learn(f, series(3, seed=cycle, start=START + cycle * 3 * DAY))
    t0 = START + 23 * DAY + 10 * HOUR
    learn(f, [r for r in series(4, seed=9, start=t0) if r[1] < 40])
    last_t = f.t
    true_full = true_time_of(100.0, 30.0, t0, 5.0)
    assert abs(f.full_at() - true_full) < 2 * HOUR, (f.full_at() - true_full) / HOUR
    assert f.full_at() > last_t
    assert 24 < f.rate_pct_per_day() < 36  # ~30 % a day


def test_daily_and_weekly_rhythm_are_learned():
    f = BinForecast()
    t = START
    fill = 0.0
    for _ in range(14 * 24):
        fill += rate(t + HOUR / 2, 20.0)
        t += HOUR
        if fill > 95:
            fill = 2.0
        f.update(t, fill)
    afternoon, night = f.day[14], f.day[3]
    assert afternoon > 3 * night
    weekend, weekday = (f.week[5] + f.week[6]) / 2, sum(f.week[:5]) / 5
    assert weekend > 1.1 * weekday


def test_a_pickup_resets_the_level_and_keeps_the_rate():
    f = learn(BinForecast(), series(3, per_day=30.0))
    assert f.level > 80
    rate_before = f.rate_pct_per_day()
    assert f.update(f.t + HOUR, 3.0) is True  # emptied
    assert f.level == 3.0
    assert abs(f.rate_pct_per_day() - rate_before) < 0.01
    assert f.full_at() - f.t > 2 * DAY  # a full bin's worth to go again


def test_a_stray_echo_moves_the_forecast_little():
    f = learn(BinForecast(), series(4, per_day=20.0, seed=3))
    before = f.full_at()
    f.update(f.t + HOUR, f.raw + 40.0)  # a bag right under the sensor, gone an hour later
    f.update(f.t + HOUR, f.raw - 40.0 + 0.8)
    assert abs(f.full_at() - before) < 6 * HOUR


def test_missing_readings_and_a_long_silence():
    dense = learn(BinForecast(), series(6, per_day=25.0, seed=4))
    sparse = learn(BinForecast(), series(6, per_day=25.0, seed=4, p_missing=0.4))
    assert abs(dense.rate_pct_per_day() - sparse.rate_pct_per_day()) < 4
    t = sparse.t
    sparse.update(t + 3 * DAY, 50.0)  # three days of silence: no rate is learned across it
    assert sparse.level == 50.0 and abs(sparse.rate_pct_per_day() - dense.rate_pct_per_day()) < 4


def test_no_forecast_before_enough_history_or_when_nothing_comes_in():
    f = BinForecast()
    assert f.full_at() is None and f.rate_pct_per_day() is None
    f.update(START, 10.0)
    f.update(START + HOUR, 11.0)
    assert f.full_at() is None  # an hour of history is not a forecast
    flat = learn(BinForecast(), [(START + h * HOUR, 20.0) for h in range(72)])
    assert flat.full_at() is None  # not filling: not predictable within the horizon


def test_store_survives_a_restart(tmp_path):
    path = str(tmp_path / "forecast.sqlite")
    store = ForecastStore(path)
    for t, fill in series(3, per_day=30.0):
        got = store.update("bin-a", t, min(100.0, fill))
    assert store.save()  # not due yet: nothing written with each group commit
    assert ForecastStore(path).bins == {}
    store.set_firmware("0000a1", "1.2.3")
    store.close()  # a clean stop saves what is due or not
    again = ForecastStore(path)
    assert again.bins["bin-a"].full_at() == got[1]
    assert again.bins["bin-a"].to_bytes() == BinForecast.from_bytes(again.bins["bin-a"].to_bytes()).to_bytes()
    assert again.firmware() == {"0000a1": "1.2.3"}


readings = st.lists(st.tuples(st.floats(0.0, 30 * HOUR), st.one_of(st.none(), st.floats(0.0, 100.0))), max_size=80)


@settings(max_examples=200, deadline=None)
@given(readings)
def test_any_series_keeps_constant_state_and_sane_forecasts(steps):
    f = BinForecast()
    t = START
    size = len(f.to_bytes())
    for dt, fill in steps:
        t += dt
        f.update(t, fill)
        assert len(f.to_bytes()) == size  # constant memory
        full_at = f.full_at()
        if full_at is not None:
            assert f.t <= full_at <= f.t + forecast.HORIZON_DAYS * DAY
        rate_per_day = f.rate_pct_per_day()
        assert rate_per_day is None or rate_per_day >= 0
        assert abs(sum(f.day) / 24 - 1) < 1e-6 and abs(sum(f.week) / 7 - 1) < 1e-6
    assert BinForecast.from_bytes(f.to_bytes()).to_bytes() == f.to_bytes()


def cycles(days, per_day, noise, seed, empty_at=95.0):
    """Hourly readings of a bin emptied whenever it reaches empty_at; also the true fill at each."""
    rng = random.Random(seed)
    t, fill, out = START, 5.0, []
    while t < START + days * DAY:
        for _ in range(6):
            fill += rate(t, per_day) / 6
            t += HOUR / 6
        out.append((t, fill + rng.gauss(0, noise), fill))
        if fill >= empty_at:
            fill = rng.uniform(0.0, 5.0)
    return out


def true_fill_at(per_day, t0, fill0, t1):
    t, fill = t0, fill0
    while t < t1:
        fill += rate(t, per_day) / 60
        t += 60.0
    return fill


@settings(max_examples=40, deadline=None)
@given(st.floats(15.0, 60.0), st.floats(0.0, 0.8), st.integers(0, 10_000), st.floats(0.0, 7 * 24.0))
@example(per_day=28.75, noise=0.75, seed=165, hours_later=62.0)  # full on a Sunday evening, forecast after the night
def test_forecasts_after_three_weeks_are_near_the_truth(per_day, noise, seed, hours_later):
    """Any rate from 15 to 60 % a day (a bin full in 2 to 7 days), sensor noise up to 0.8 points
    (the simulated sensors' is about 0.5), three weeks of history, any later reading: when the
    forecast says full, the bin is truly 85-115 % full (judged in fill, not hours: a bin that
    crosses full around midnight crawls for hours, where a small rate error is a large time error)."""
    history = cycles(28, per_day, noise, seed, empty_at=105.0)  # emptied past full: each crossing of 100 is seen
    f = BinForecast()
    cut = START + 21 * DAY + hours_later * HOUR
    learn(f, [(t, v) for t, v, _ in history if t <= cut])
    true_now = [x for x in history if x[0] <= cut][-1][2]
    if f.full_at() is None or f.level >= 99.0 or true_now >= 99.0:
        return
    at_forecast = true_fill_at(per_day, f.t, true_now, f.full_at())
    assert 85.0 <= at_forecast <= 115.0
    true_full = true_time_of(100.0, per_day, f.t, true_now)
    if true_full - f.t <= 30 * HOUR:  # within a day or so: in hours too, of the bin's mean filling speed
        # (the forecast of a bin full at 19:00 may say 07:00 the next morning: a night's crawl
        # between them is twelve hours but hardly any waste, no error a planner pays for)
        assert abs(at_forecast - 100.0) / (per_day / 24.0) * HOUR <= 0.25 * (true_full - f.t) + 3 * HOUR


class Twins:
    """A BinForecast going on from its bytes now and then, one that never does (its cache lives on),
    and ForecastStore.update (what the gateway calls), side by side: they must agree to the bit."""

    def __init__(self):
        self.f, self.kept, self.store = BinForecast(), BinForecast(), ForecastStore(":memory:")

    def step(self, t, fill, full_pct=None, reload=False):
        """One reading into all three: the same update() return, rate and full_at (for another fill
        level too: no stale or mixed-up cache) and to_bytes, each float to the bit (repr tells -0.0
        from 0.0); a forecast rebuilt from the bytes (no cache at all) answers the same."""
        f, kept = self.f, self.kept
        assert f.update(t, fill) is kept.update(t, fill)
        assert repr(self.store.update("b", t, fill)) == repr((f.rate_pct_per_day(), f.full_at()))
        fresh = BinForecast.from_bytes(f.to_bytes())
        if full_pct is not None:
            assert repr(f.full_at(full_pct)) == repr(kept.full_at(full_pct)) == repr(fresh.full_at(full_pct))
        answers = [repr((x.rate_pct_per_day(), x.full_at())) for x in (f, kept, fresh)]
        assert answers[0] == answers[1] == answers[2]
        assert f.to_bytes() == kept.to_bytes() == self.store.bins["b"].to_bytes()
        if reload:
            self.f = BinForecast.from_bytes(f.to_bytes())


gaps = st.one_of(st.just(0.0), st.floats(-600.0, 0.0), st.floats(0.0, 60.0), st.floats(60.0, 2 * HOUR),
                 st.floats(600.0, HOUR), st.floats(2 * HOUR, 50 * HOUR))  # repeated, out of order, seconds to two days
fills = st.one_of(st.none(), st.floats(0.0, 110.0), st.tuples(st.just("rise"), st.floats(-3.0, 8.0)),
                  st.tuples(st.just("rise"), st.floats(-0.3, 1.0)), st.tuples(st.just("pickup"), st.floats(0.0, 10.0)))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(gaps, fills, st.sampled_from([None, 90.0, 100.0, 120.0]), st.booleans()), max_size=300),
       st.floats(0.0, 7 * DAY), st.one_of(st.none(), st.tuples(st.floats(0.0, 1.0), st.sampled_from([math.nan, math.inf]))))
def test_any_series_gives_the_same_results_cached_persisted_and_through_the_store(steps, offset, non_finite):
    """Rises, pickups, any fill to 110 %, faulty readings; repeated, out of order, seconds to two
    days apart; now and then a NaN or infinite reading (no decoder gives one)."""
    twins, t, fill = Twins(), START + offset, 5.0
    for i, (gap, step, full_pct, reload) in enumerate(steps):
        t += gap
        if isinstance(step, tuple):
            kind, value = step
            fill = step = min(110.0, max(0.0, fill + value if kind == "rise" else value))
        elif step is not None:
            fill = step
        if non_finite is not None and i == int(non_finite[0] * len(steps)):
            step = non_finite[1]
        twins.step(t, step, full_pct, reload)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.floats(0.5, 60.0), st.floats(0.0, 2.0), st.sampled_from([60.0, 600.0, 1800.0, 4 * HOUR]))
def test_weeks_of_readings_give_the_same_results_cached_persisted_and_through_the_store(seed, per_day, noise, every_s):
    """Up to five weeks of a bin with a daily and weekly rhythm (the multipliers learn), filling in
    half a day to 200 days (the walk reaches the horizon), read every minute to every few hours with
    silences, repeats and faulty readings, emptied at 80-110 %."""
    rng, twins = random.Random(seed), Twins()
    t, fill = START + rng.uniform(0, 7 * DAY), rng.uniform(0, 20)
    for _ in range(int(min(2000, 35 * DAY / every_s))):
        roll = rng.random()
        if roll < 0.01:
            dt = rng.uniform(0, 50 * HOUR)  # a silence
        elif roll < 0.04:
            dt = 0.0  # the same time again
        else:
            dt = rng.expovariate(1 / every_s)
        fill += sum(rate(t + k / 4 * dt, per_day) for k in range(4)) / 4 * dt / HOUR
        t += dt
        if fill > rng.uniform(80, 110):
            fill = rng.uniform(0, 5)
        reading = None if rng.random() < 0.02 else max(0.0, min(110.0, fill + rng.gauss(0, noise)))
        twins.step(t, reading, rng.choice([None, 90.0]), rng.random() < 0.02)


# Golden vectors: the frozen reference of the forecast algorithm as of 0.3 (tests/vectors/forecast.json,
# written by tests/vectors/make_forecast_vectors.py). Every output of every step, to the bit.
GOLDEN = json.loads((pathlib.Path(__file__).parent / "vectors" / "forecast.json").read_text())["series"]


@pytest.mark.parametrize("series", GOLDEN, ids=[s["name"] for s in GOLDEN])
def test_golden_vectors_give_the_frozen_reference_results_to_the_bit(series):
    """Mixed series (rises, pickups, faulty and non-finite readings, repeated and out-of-order
    times, silences up to two days) and weeks of rhythmic bins: update's return, rate, full_at
    (for a second level too) and the persisted bytes after every step, through BinForecast
    (going on from its bytes where the vector says) and ForecastStore alike."""
    f, h, store = BinForecast(), hashlib.sha256(), ForecastStore(":memory:")
    checkpoints = dict(series["checkpoints"])
    last = 0
    for n, (t, fill, full_pct, reload) in enumerate(series["steps"], 1):
        fill = vectors.decode_fill(fill)
        digest = vectors.digest_chain(h, vectors.outputs(f, t, fill, full_pct), f.to_bytes())
        assert repr(store.update("b", t, fill)) == repr((f.rate_pct_per_day(), f.full_at()))
        assert store.bins["b"].to_bytes() == f.to_bytes()
        if n in checkpoints:
            assert digest == checkpoints[n], "%s: an output differs from the reference in steps %d..%d" % (
                series["name"], last + 1, n)
            last = n
        if reload:
            f = BinForecast.from_bytes(f.to_bytes())
    assert last == len(series["steps"])
    final = series["final"]
    assert (f.to_bytes().hex(), repr(f.rate_pct_per_day()), repr(f.full_at())) == (final["state"], final["rate"], final["full_at"])


def test_golden_vectors_cover_what_they_claim():
    steps = [s for series in GOLDEN for s in series["steps"]]
    fills = [vectors.decode_fill(s[1]) for s in steps]
    assert len(GOLDEN) >= 40 and len(steps) >= 10000
    assert any(f is None for f in fills) and any(isinstance(f, float) and math.isnan(f) for f in fills)
    assert any(f == math.inf for f in fills) and any(s[3] for s in steps) and {s[2] for s in steps} >= {None, 90.0, 120.0}
    times = [[s[0] for s in series["steps"]] for series in GOLDEN]
    assert any(b < a for ts in times for a, b in zip(ts, ts[1:]))  # out of order
    assert any(b - a > 48 * HOUR for ts in times for a, b in zip(ts, ts[1:]))  # a silence past MAX_GAP_H
    weeks = [s for s in GOLDEN if s["name"].startswith("weeks")]
    assert any(s["steps"][-1][0] - s["steps"][0][0] > 20 * DAY for s in weeks)  # the weekly multipliers learn
