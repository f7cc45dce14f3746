"""The per-bin forecast on synthetic series: rhythm, noise, gaps, pickups, persistence."""
import math
import random
import struct

from hypothesis import given, settings, strategies as st

from binlink.gateway import forecast
from binlink.gateway.forecast import BinForecast, ForecastStore

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
    assert 85.0 <= true_fill_at(per_day, f.t, true_now, f.full_at()) <= 115.0
    true_full = true_time_of(100.0, per_day, f.t, true_now)
    if true_full - f.t <= 30 * HOUR:  # within a day or so: in hours too
        assert abs(f.full_at() - true_full) <= 0.25 * (true_full - f.t) + 3 * HOUR


def reference_hour_and_weekday(t):
    days = t // DAY
    return int((t - days * DAY) // HOUR), int(days + 3) % 7


class ReferenceBinForecast:
    """The reference implementation: BinForecast as of commit 35acbc8, frozen (no cache, builtin
    min/max, full_at walking hour by hour). BinForecast, rewritten for speed, must give the same
    results to the bit; the constants are the module's. A deliberate change to the model changes both."""

    def __init__(self):
        self.t = self.level = self.raw = None
        self.rise_sum = forecast.PRIOR_RATE * forecast.PRIOR_WEIGHT_H
        self.shape_sum = forecast.PRIOR_WEIGHT_H
        self.learned_h = 0.0
        self.day_no, self.day_rise, self.day_expect, self.day_hours = -1.0, 0.0, 0.0, 0.0
        self.day = [1.0] * 24
        self.week = [1.0] * 7

    def to_bytes(self):
        head = (-1.0 if self.t is None else self.t, -1.0 if self.level is None else self.level,
                -1.0 if self.raw is None else self.raw, self.rise_sum, self.shape_sum, self.learned_h,
                self.day_no, self.day_rise, self.day_expect, self.day_hours)
        return struct.pack("<10d24d7d", *head, *self.day, *self.week)

    @property
    def base(self):
        return max(0.0, self.rise_sum / self.shape_sum) if self.shape_sum > 0 else 0.0

    def shape_hours(self, t0, t1):
        total = plain = 0.0
        t = t0
        while t < t1:
            hour, weekday = reference_hour_and_weekday(t)
            end = min(t1, (t // HOUR + 1) * HOUR)
            part = (end - t) / HOUR * self.day[hour]
            plain += part
            total += part * self.week[weekday]
            t = end
        return total, plain

    def update(self, t, fill, pickup_drop_pct=15.0):
        if fill is None or (self.t is not None and t <= self.t):
            return False
        if self.t is None or t - self.t > forecast.MAX_GAP_H * HOUR:
            self.t, self.level, self.raw = t, fill, fill
            return False
        if fill < self.level - pickup_drop_pct:
            self.t, self.level, self.raw = t, fill, fill
            return True
        dt_h = (t - self.t) / HOUR
        shape, shape_without_week = self.shape_hours(self.t, t)
        expected = self.base * shape
        clip = forecast.INNOVATION_CLIP
        rise = min(max(fill - self.raw, -clip), expected + clip)
        if shape > 0 and max(fill, self.raw) < forecast.SATURATED_PCT:
            self._learn_week(t, rise, self.base * shape_without_week, dt_h)
            keep = math.exp(-dt_h / forecast.BASE_TAU_H)
            self.rise_sum = self.rise_sum * keep + rise
            self.shape_sum = self.shape_sum * keep + shape
            base = self.base
            if base > 0 and dt_h <= 6.0:
                hour, weekday = reference_hour_and_weekday((self.t + t) / 2)
                seen_days = self.learned_h / 24.0
                q = rise / (base * dt_h * self.week[weekday])
                self._learn(self.day, hour, q, max(forecast.DAY_GAIN, 1.0 / (2.0 + seen_days)))
        predicted = self.level + expected
        self.level = max(0.0, predicted + forecast.LEVEL_GAIN * max(-clip, min(clip, fill - predicted)))
        self.t, self.raw = t, fill
        self.learned_h += dt_h
        return False

    def _learn_week(self, t, rise, expect_without_week, dt_h):
        day_no = float((self.t + t) / 2 // DAY)
        if day_no != self.day_no:
            if self.day_hours >= forecast.MIN_DAY_HOURS and self.day_expect > 0 and self.learned_h >= forecast.WEEK_AFTER_H:
                weekday = int(self.day_no + 3) % 7
                weeks_seen = int(self.learned_h // (7 * 24))
                self._learn(self.week, weekday, self.day_rise / self.day_expect, max(forecast.WEEK_GAIN, 1.0 / (1.0 + weeks_seen)))
            self.day_no, self.day_rise, self.day_expect, self.day_hours = day_no, 0.0, 0.0, 0.0
        self.day_rise += rise
        self.day_expect += expect_without_week
        self.day_hours += dt_h

    @staticmethod
    def _learn(shape, i, q, gain):
        q = max(-forecast.SHAPE_MAX, min(forecast.SHAPE_MAX, q))
        shape[i] = max(forecast.SHAPE_MIN, min(forecast.SHAPE_MAX, shape[i] + gain * (q - shape[i])))
        mean = sum(shape) / len(shape)
        if mean > 0:
            shape[:] = [v / mean for v in shape]

    def rate_pct_per_day(self):
        return None if self.learned_h < forecast.MIN_LEARNED_H else round(self.base * 24.0, 2)

    def full_at(self, full_pct=100.0):
        if self.t is None or self.learned_h < forecast.MIN_LEARNED_H:
            return None
        if self.level >= full_pct:
            return self.t
        if self.base <= 1e-6:
            return None
        need = (full_pct - self.level) / self.base
        day, week = self.day, self.week
        hour, weekday = reference_hour_and_weekday(self.t)
        t = (self.t // HOUR + 1) * HOUR
        rate = day[hour] * week[weekday]
        gain = (t - self.t) / HOUR * rate
        if gain >= need:
            return self.t + need / rate * HOUR
        need -= gain
        end = self.t + forecast.HORIZON_DAYS * DAY
        day_sum = sum(day)
        while t < end:
            hour += 1
            if hour == 24:
                hour, weekday = 0, (weekday + 1) % 7
            if hour == 0 and day_sum * week[weekday] < need:
                need -= day_sum * week[weekday]
                t += DAY
                hour = 23
                continue
            rate = day[hour] * week[weekday]
            if rate >= need:
                at = t + need / rate * HOUR
                return at if at <= end else None
            need -= rate
            t += HOUR
        return None


class Twins:
    """BinForecast, ForecastStore.update (what the gateway calls) and the reference, side by side."""

    def __init__(self):
        self.ref, self.f, self.store = ReferenceBinForecast(), BinForecast(), ForecastStore(":memory:")

    def step(self, t, fill, full_pct=None, reload=False):
        """One reading into all three: the same update() return, rate and full_at (for another fill
        level too: no stale or mixed-up cache) and to_bytes, each float to the bit (repr tells -0.0
        from 0.0). reload: the BinForecast goes on from its bytes (no cache)."""
        ref, f = self.ref, self.f
        assert f.update(t, fill) is ref.update(t, fill)
        assert repr(self.store.update("b", t, fill)) == repr((ref.rate_pct_per_day(), ref.full_at()))
        if full_pct is not None:
            assert repr(f.full_at(full_pct)) == repr(ref.full_at(full_pct))
        assert repr((f.rate_pct_per_day(), f.full_at())) == repr((ref.rate_pct_per_day(), ref.full_at()))
        assert f.to_bytes() == self.store.bins["b"].to_bytes() == ref.to_bytes()
        if reload:
            self.f = BinForecast.from_bytes(f.to_bytes())


gaps = st.one_of(st.just(0.0), st.floats(-600.0, 0.0), st.floats(0.0, 60.0), st.floats(60.0, 2 * HOUR),
                 st.floats(600.0, HOUR), st.floats(2 * HOUR, 50 * HOUR))  # repeated, out of order, seconds to two days
fills = st.one_of(st.none(), st.floats(0.0, 110.0), st.tuples(st.just("rise"), st.floats(-3.0, 8.0)),
                  st.tuples(st.just("rise"), st.floats(-0.3, 1.0)), st.tuples(st.just("pickup"), st.floats(0.0, 10.0)))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(gaps, fills, st.sampled_from([None, 90.0, 100.0, 120.0]), st.booleans()), max_size=300),
       st.floats(0.0, 7 * DAY), st.one_of(st.none(), st.tuples(st.floats(0.0, 1.0), st.sampled_from([math.nan, math.inf]))))
def test_any_series_gives_the_reference_implementations_results_to_the_bit(steps, offset, non_finite):
    """Rises, pickups, any fill to 110 %, faulty readings; repeated, out of order, seconds to two
    days apart; now and then a NaN or infinite reading (no decoder gives one: the rewritten
    min/max must agree with the builtins all the same)."""
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
def test_weeks_of_readings_give_the_reference_implementations_results_to_the_bit(seed, per_day, noise, every_s):
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
