"""The part models' speed work (issue 21: a city-sized simulation in five minutes) must not change
what they compute. Seeded bins of every transport and sensor, a downlink answering the bins that
listen, a cold aged cell that browns out and a stored (passivated) one, run for a couple of
simulated days on the real firmware (CPython); every payload put on air must match the recorded
one byte for byte, and the charge, brown-outs and resets of every wake the record's.

The record, tests/vectors/sim_identity.json, was made at commit 73d8670 (before the part models
were made faster) by `python -m tests.test_sim_speed_identity`. Regenerate it only for a change
that is meant to change the simulation, and say so in its commit."""
import json
import math
import pathlib
import random
import sys

from binlink.sim import physics
from binlink.sim.device import SimDevice
from tests.test_firmware_downlink import Gateway

VECTOR = pathlib.Path(__file__).resolve().parent / "vectors" / "sim_identity.json"
KEY = bytes(range(16))  # TEST KEY
T0 = 1_790_000_000.0
COUNTS = ("brownouts", "resets", "sleep_s", "rx")
REL = 1e-9  # the charge's summation order may move its last bits, never more

# name -> (SimDevice keywords, wakes, a gateway answering downlink windows, the wake from which
# the air is at +10 degC or None)
CASES = {
    "e22-jsn": (dict(transport="e22", sensor="jsn-sr04t", report_s=900), 192, True, None),
    "rylr998-a02yyuw": (dict(transport="rylr998", sensor="a02yyuw", report_s=900), 192, True, None),
    "e32-hcsr04-slow": (dict(transport="e32", sensor="hc-sr04", timing="slow"), 96, False, None),
    "e22-cold-aged-cell": (dict(transport="e22", report_s=900, weather=physics.Weather(mean_c=-20.0, swing_c=0.0),
                                cell={"used_mah": 0.85 * 17000, "age_years": 8.0}), 48, False, 16),
    "rylr998-stored-cell": (dict(transport="rylr998", sensor="hc-sr04", weather=physics.Weather(mean_c=-8.0),
                                 cell={"passivation": 1.0, "used_mah": 0.9 * 17000}), 96, False, None),
    "e22-devboard": (dict(transport="e22", profile="devboard"), 48, False, None),
    "serial-a02yyuw": (dict(transport="serial", sensor="a02yyuw"), 48, False, None),
    "wifi-jsn": (dict(transport="wifi"), 48, False, None),
}


def run_case(name):
    """One record per wake: the payloads put on air (hex), the board's charge and brown-outs, the
    cell's passivation, the device's resets, the time it sleeps and the downlinks its radio received."""
    kw, wakes, answer, warm_at = CASES[name]
    clock = [T0]
    dev = SimDevice(random.Random(sum(map(ord, name))), 0xA1, KEY, lambda: clock[0], **kw)
    if answer:
        Gateway(dev)
    out = []
    for i in range(wakes):
        if i == warm_at:
            dev.weather.mean_c = 10.0
        sent = len(dev.sent)
        sleep = dev.wake()
        out.append({"air": [p.hex() for _, p in dev.sent[sent:]], "charge_mAs": dev.hw.charge_mAs,
                    "brownouts": dev.hw.brownouts, "resets": dev.resets, "sleep_s": sleep,
                    "passivation": dev.battery.passivation, "rx": len(getattr(dev.hw.radio, "received", ()))})
        clock[0] += sleep
        dev.bin.advance(clock[0])
    return out


def test_the_part_models_put_the_recorded_frames_on_air_for_the_recorded_charge():
    record = json.loads(VECTOR.read_text())
    assert sorted(record) == sorted(CASES)
    assert record["e22-cold-aged-cell"][-1]["brownouts"] and record["e22-jsn"][-1]["rx"]  # brown-outs, downlinks covered
    for name in CASES:
        got = run_case(name)
        assert len(got) == len(record[name])
        for i, (g, r) in enumerate(zip(got, record[name])):
            where = "%s wake %d" % (name, i)
            assert g["air"] == r["air"], where
            assert [g[k] for k in COUNTS] == [r[k] for k in COUNTS], where
            for k in ("charge_mAs", "passivation"):
                assert math.isclose(g[k], r[k], rel_tol=REL, abs_tol=1e-300), (where, k, g[k], r[k])


if __name__ == "__main__":
    VECTOR.write_text(json.dumps({name: run_case(name) for name in CASES}, indent=0, sort_keys=True) + "\n")
    sys.stdout.write("wrote %s\n" % VECTOR)
