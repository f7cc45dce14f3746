"""The part models' speed work (issue 21: a city-sized simulation in five minutes) must not change
what they compute. Seeded bins of every transport and sensor, a downlink answering the bins that
listen, a cold aged cell that browns out and a stored (passivated) one, ran for a couple of
simulated days on the real firmware; every hardware call the firmware made was recorded with a
digest of the answers, and so were the downlink packets put on air for the bins.

The test replays those calls into the boards of today: every answer, every payload the radio put
on air (byte for byte), the brown-outs and resets of every wake must be the recorded ones, and the
charge and the cell's passivation too (to 1e-9: summation order may move the last bits). Replayed,
not rerun, so that the firmware may change without the record: the part models are what it pins.

tests/vectors/sim_identity.json.gz was made with the part models of commit 73d8670 (before they were
made faster) by `python -m tests.test_sim_speed_identity`, and made again when the Wi-Fi model was
fixed (an association ends with the radio: each wake's connect takes its time again; the bins of
the other bins replay the old record unchanged), and again when the bin's physics stopped
depending on when it is looked at (physics.Bin: the echoes the sensors return changed, the part
models did not: made with the part models of e155b1e), and when the bin's waste got a random
stream of its own, apart from its sensor's (made with the part models of 0830b8a). Make it again
only for a change that is meant to change what the part models compute, and say so in its commit."""
import gzip
import hashlib
import json
import math
import pathlib
import random
import sys

from binlink.sim import physics
from binlink.sim.device import SimDevice
from binlink.sim.parts.board import Board

VECTOR = pathlib.Path(__file__).resolve().parent / "vectors" / "sim_identity.json.gz"
KEY = bytes(range(16))  # TEST KEY
T0 = 1_790_000_000.0
COUNTS = ("brownouts", "resets", "sleep_s", "rx")
REL = 1e-9

# name -> (SimDevice keywords, with weather as (mean, swing) degC; wakes; a gateway answering
# downlink windows; the wake from which the air is at +10 degC, or None)
CASES = {
    "e22-jsn": (dict(transport="e22", sensor="jsn-sr04t", report_s=900), 96, True, None),
    "rylr998-a02yyuw": (dict(transport="rylr998", sensor="a02yyuw", report_s=900), 96, True, None),
    "e32-hcsr04-slow": (dict(transport="e32", sensor="hc-sr04", timing="slow"), 48, False, None),
    "e22-cold-aged-cell": (dict(transport="e22", report_s=900, weather=(-20.0, 0.0),
                                cell={"used_mah": 0.85 * 17000, "age_years": 8.0}), 40, False, 16),
    "rylr998-stored-cell": (dict(transport="rylr998", sensor="hc-sr04", weather=(-8.0, 5.0),
                                 cell={"passivation": 1.0, "used_mah": 0.9 * 17000}), 48, False, None),
    "e22-devboard": (dict(transport="e22", profile="devboard"), 24, False, None),
    "serial-a02yyuw": (dict(transport="serial", sensor="a02yyuw"), 24, False, None),
    "wifi-jsn": (dict(transport="wifi"), 24, False, None),
}


def _digest(answers):
    return hashlib.sha256(json.dumps(answers, sort_keys=True).encode()).hexdigest()[:16]


def _run(name, dev, clock):
    """The case's wakes; one record per wake: the payloads put on air (hex), the board's charge
    and brown-outs, the cell's passivation, the device's resets, the time it sleeps and the
    downlinks its radio received."""
    _, wakes, _, warm_at = CASES[name]
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


def _device(name):
    clock = [T0]
    kw = dict(CASES[name][0])
    if "weather" in kw:  # a new one each time: a case warms its air up
        kw["weather"] = physics.Weather(*kw["weather"])
    return SimDevice(random.Random(sum(map(ord, name))), 0xA1, KEY, lambda: clock[0], **kw), clock


def record(name):
    """The case on the real firmware: its wakes, the board's wiring, every run of the firmware as
    its calls [op, args] and a digest of the answers, and the packets put on air for the bin at each
    of its transmissions [payload hex, start ms, sf, bw kHz]."""
    from tests.test_firmware_downlink import Gateway  # the replay needs only what it put on air

    dev, clock = _device(name)
    runs, downlinks = [], []
    if CASES[name][2]:
        Gateway(dev)
    heard = dev._transmit

    def on_air(d, payload, on_air_len):
        downlinks.append([])
        return heard(d, payload, on_air_len) if heard else True

    def air_packet(payload, start_ms, sf, bw_khz):
        downlinks[-1].append([bytes(payload).hex(), start_ms, sf, bw_khz])
        return Board.air_packet(dev.hw, payload, start_ms, sf, bw_khz)

    def dispatch(op, args):
        answer = Board.dispatch(dev.hw, op, args)
        runs[-1]["calls"].append([op, list(args)])
        runs[-1]["answers"].append(answer)
        return answer

    def run_firmware(run=dev._run_firmware):
        runs.append({"calls": [], "answers": []})
        run()

    dev._transmit, dev.hw.air_packet, dev.hw.dispatch, dev._run_firmware = on_air, air_packet, dispatch, run_firmware
    wakes = _run(name, dev, clock)
    for r in runs:
        r["answers"] = _digest(r["answers"])
    return {"cfg": dict(dev.cfg, key=dev.cfg["key"].hex()), "wakes": wakes, "runs": runs, "downlinks": downlinks}


def replay(name, rec):
    """The recorded calls into a board wired as recorded; returns (wakes, answers' digest per run)."""
    dev, clock = _device(name)
    kw = CASES[name][0]
    dev.hw = Board(dict(rec["cfg"], key=bytes.fromhex(rec["cfg"]["key"])), dev.battery, dev._surface,
                   lambda: dev.weather.air_c(dev.clock()), dev.sensor, dev._on_air, dev.sensor.rng,
                   profile=kw.get("profile", "custom"), timing=kw.get("timing", "random"))
    runs, downlinks, digests = iter(rec["runs"]), iter(rec["downlinks"]), []

    def on_air(d, payload, on_air_len):
        for p, start, sf, bw in next(downlinks):
            dev.hw.air_packet(bytes.fromhex(p), start, sf, bw)
        return True

    def run_firmware():
        digests.append(_digest([dev.hw.dispatch(op, args) for op, args in next(runs)["calls"]]))

    dev._transmit, dev._run_firmware = on_air, run_firmware
    return _run(name, dev, clock), digests


def test_the_part_models_answer_the_recorded_calls_and_put_the_recorded_frames_on_air_for_the_recorded_charge():
    record_ = json.loads(gzip.decompress(VECTOR.read_bytes()))
    assert sorted(record_) == sorted(CASES)
    assert record_["e22-cold-aged-cell"]["wakes"][-1]["brownouts"] and record_["e22-jsn"]["wakes"][-1]["rx"]
    for name in CASES:
        rec = record_[name]
        wakes, digests = replay(name, rec)
        assert digests == [r["answers"] for r in rec["runs"]], name
        for i, (g, r) in enumerate(zip(wakes, rec["wakes"])):
            where = "%s wake %d" % (name, i)
            assert g["air"] == r["air"], where
            assert [g[k] for k in COUNTS] == [r[k] for k in COUNTS], where
            for k in ("charge_mAs", "passivation"):
                assert math.isclose(g[k], r[k], rel_tol=REL, abs_tol=1e-300), (where, k, g[k], r[k])


if __name__ == "__main__":
    data = json.dumps({name: record(name) for name in CASES}, separators=(",", ":"), sort_keys=True).encode()
    VECTOR.write_bytes(gzip.compress(data, 9, mtime=0))
    sys.stdout.write("wrote %s\n" % VECTOR)
