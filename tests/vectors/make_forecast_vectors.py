"""Writes tests/vectors/forecast.json: golden vectors for the per-bin forecast (gateway/forecast.py).

The vectors are the frozen reference of the forecast algorithm as of 0.3 (generated from
BinForecast at commit ab466e8, where it matched, to the bit, the reference implementation that
tests/test_forecast.py carried until then). test_forecast.py replays them: any change in any
output (update's return, rate, full_at for two fill levels, the persisted bytes) fails it.

Run this ONLY for a deliberate change to the model, and say so in the commit: regenerating makes
the code under test its own oracle.

    .venv/bin/python -m tests.vectors.make_forecast_vectors

Each series: steps [t, fill, full_pct, reload]: fill a float, null (a faulty reading) or "nan" /
"inf"; full_pct null or a second level full_at() is asked for; reload 1: the forecast goes on from
its persisted bytes. checkpoints [[n, digest]]: the sha256 chain over the outputs of steps 0..n-1
(digest_chain below, shared with the test), every CHECK_EVERY steps and at the end; final: the
last persisted state in hex, with the rate and full_at after the last step (repr)."""
import hashlib
import json
import math
import os
import random

from binlink.gateway.forecast import BinForecast

OUT = os.path.join(os.path.dirname(__file__), "forecast.json")
HOUR, DAY = 3600.0, 86400.0
START = 1_790_208_000.0  # 2026-09-24 00:00 UTC, a Thursday
CHECK_EVERY = 50


def decode_fill(v):
    return float(v) if isinstance(v, str) else v


def encode_fill(v):
    return v if v is None or math.isfinite(v) else repr(v)


def outputs(f, t, fill, full_pct):
    """One step into f: what the vectors hold it to (reprs, so -0.0 is not 0.0 and nan is nan)."""
    ret = f.update(t, fill)
    return repr((ret, f.rate_pct_per_day(), f.full_at(), None if full_pct is None else f.full_at(full_pct))).encode()


def digest_chain(h, out, state):
    h.update(len(out).to_bytes(2, "big") + out + state)
    return h.hexdigest()[:20]


def run(steps):
    f, h, checkpoints = BinForecast(), hashlib.sha256(), []
    for n, (t, fill, full_pct, reload) in enumerate(steps, 1):
        d = digest_chain(h, outputs(f, t, decode_fill(fill), full_pct), f.to_bytes())
        if n % CHECK_EVERY == 0 or n == len(steps):
            checkpoints.append([n, d])
        if reload:
            f = BinForecast.from_bytes(f.to_bytes())
    return {"checkpoints": checkpoints,
            "final": {"state": f.to_bytes().hex(), "rate": repr(f.rate_pct_per_day()), "full_at": repr(f.full_at())}}


def rate(t, per_day):
    """% per hour: quiet nights, busy afternoons, 1.3x at weekends (as tests/test_forecast.py)."""
    hour = (t % DAY) / HOUR
    daily = 0.25 + 1.5 * max(0.0, math.sin(math.pi * (hour - 7) / 14)) if 7 <= hour <= 21 else 0.25
    weekly = 1.3 if int(t // DAY + 3) % 7 >= 5 else 1.0
    return per_day / 24.0 * daily * weekly / 0.876


def mixed(seed):
    """Rises, pickups, any fill to 110 %, faulty readings; repeated, out of order, seconds to two
    days apart; in some series a NaN or infinite reading (no decoder gives one)."""
    rng = random.Random(seed)
    t, fill, steps = START + rng.uniform(0, 7 * DAY), 5.0, []
    n = rng.choice([0, 1, 2, 5, 20]) if seed % 5 == 0 else rng.randint(20, 300)
    odd = rng.randrange(n) if n and rng.random() < 0.4 else None
    gaps = [lambda: 0.0, lambda: rng.uniform(-600.0, 0.0), lambda: rng.uniform(0.0, 60.0),
            lambda: rng.uniform(60.0, 2 * HOUR), lambda: rng.uniform(600.0, HOUR), lambda: rng.uniform(2 * HOUR, 50 * HOUR)]
    for i in range(n):
        t += rng.choice(gaps)()
        kind = rng.randrange(5)
        if kind == 0:
            step = None
        else:
            step = fill = {1: lambda: rng.uniform(0.0, 110.0), 2: lambda: min(110.0, max(0.0, fill + rng.uniform(-3.0, 8.0))),
                           3: lambda: min(110.0, max(0.0, fill + rng.uniform(-0.3, 1.0))),
                           4: lambda: rng.uniform(0.0, 10.0)}[kind]()
        if i == odd:
            step = rng.choice([math.nan, math.inf])
        steps.append([t, encode_fill(step), rng.choice([None, 90.0, 100.0, 120.0]), int(rng.random() < 0.1)])
    return steps


def weeks(seed, per_day, noise, every_s, cap=1200):
    """Weeks of a bin with a daily and weekly rhythm, read every minute to every few hours with
    silences, repeats and faulty readings, emptied at 80-110 %."""
    rng = random.Random(seed)
    t, fill, steps = START + rng.uniform(0, 7 * DAY), rng.uniform(0, 20), []
    for _ in range(int(min(cap, 35 * DAY / every_s))):
        roll = rng.random()
        dt = rng.uniform(0, 50 * HOUR) if roll < 0.01 else 0.0 if roll < 0.04 else rng.expovariate(1 / every_s)
        fill += sum(rate(t + k / 4 * dt, per_day) for k in range(4)) / 4 * dt / HOUR
        t += dt
        if fill > rng.uniform(80, 110):
            fill = rng.uniform(0, 5)
        reading = None if rng.random() < 0.02 else max(0.0, min(110.0, fill + rng.gauss(0, noise)))
        steps.append([t, reading, rng.choice([None, 90.0]), int(rng.random() < 0.02)])
    return steps


def main():
    series = [dict(name="mixed-%d" % s, steps=mixed(s)) for s in range(40)]
    for s, (per_day, noise, every_s) in enumerate([(30.0, 0.5, 4 * HOUR), (12.0, 1.0, 1800.0), (55.0, 2.0, 600.0),
                                                   (0.6, 0.2, 1800.0), (25.0, 0.0, 60.0)]):
        series.append(dict(name="weeks-%d" % s, steps=weeks(100 + s, per_day, noise, every_s)))
    for s in series:
        s.update(run(s["steps"]))
    with open(OUT, "w") as f:
        f.write('{"about": %s,\n "series": [\n' % json.dumps(__doc__.split("\n\n")[1].replace("\n", " ")))
        f.write(",\n".join(json.dumps(s, separators=(",", ":"), allow_nan=False) for s in series))
        f.write("\n]}\n")
    print("%s: %d series, %d steps" % (OUT, len(series), sum(len(s["steps"]) for s in series)))


if __name__ == "__main__":
    main()
