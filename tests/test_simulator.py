"""The simulator end to end, and its models on their own."""
import json
import math
import os
import random
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from binlink.sim import fidelity, physics
from binlink.sim.fleet import Fleet
from tests import fleet_run
from tests.harness import BINLINK


@pytest.mark.parametrize("fmt", ["raw", "raw+rssi", "rylr998"])
def test_seeded_fleet_through_gateway_matches_ground_truth(fmt, tmp_path):
    fleet, events, states, metrics = fleet_run.run(8, 86400, fmt=fmt, seed=4, tmp=str(tmp_path))
    uplinks = [e for e in events if e["event"] == "uplink"]
    ids = [e["message_id"] for e in uplinks]
    assert len(ids) == len(set(ids))
    assert len(uplinks) >= 0.9 * len(fleet.truth.readings)  # a realistic channel loses a few
    budget = {"%06x" % d.device_id: error_budget_pct(d.bin) for d in fleet.devices}
    for e in uplinks:
        fill, surface, _ = fleet.truth.readings[(e["device"], e["fcnt"])]
        if e["fill_pct"] is None:
            assert "sensor_fault" in e["flags"]
        else:  # off by no more than the bin's installation errors and its pile explain
            assert abs(e["fill_pct"] - min(100.0, fill)) <= budget[e["device"]], (e, fill)
    for d in fleet.devices:  # retained state = the bin's newest reading
        mine = [e for e in uplinks if e["bin_id"] == d.bin_id]
        assert states[d.bin_id]["fcnt"] == max(e["fcnt"] for e in mine)
    if fmt != "raw":
        assert all(e["rssi"] is not None for e in uplinks)
    if fmt == "rylr998":
        assert all(e["snr"] is not None for e in uplinks)
    score = fidelity.score(fleet.truth, None, events, fleet.now)
    assert score["false_alarms"] == 0


def error_budget_pct(b):
    """What calibration, mounting and the pile can add to a reading, plus 15 mm of noise and air."""
    mm = abs(b.depth_mm - b.nominal_depth_mm) + abs(b.mount_offset_mm) + b.pile_mm
    mm += (1 / math.cos(b.tilt) - 1) * b.depth_mm + 15.0
    return 100.0 * mm / (b.nominal_depth_mm - b.full_mm)


def test_same_seed_same_world():
    runs = []
    for _ in range(2):
        f = Fleet(5, seed=9, t0=1_790_000_000.0)
        f.run(2 * 86400)
        runs.append(([d.frames() for d in f.devices], f.truth.collections, f.channel.stats))
    assert runs[0] == runs[1]
    assert Fleet(5, seed=10, t0=1_790_000_000.0).devices[0].key != Fleet(5, seed=9, t0=1_790_000_000.0).devices[0].key


def test_fleet_on_the_micropython_vm(tmp_path):
    from binlink.sim.vm import FirmwareVM

    vm = FirmwareVM()
    try:
        fleet, events, states, metrics = fleet_run.run(3, 6 * 3600, fmt="raw+rssi", seed=2, vm=vm, tmp=str(tmp_path))
    finally:
        vm.close()
    assert all(f > 0 for d in fleet.devices for f in d.fuel)
    uplinks = [e for e in events if e["event"] == "uplink"]
    assert len(uplinks) >= 3 * 6 * 0.9  # hourly reports at least
    for e in uplinks:
        d = next(d for d in fleet.devices if "%06x" % d.device_id == e["device"])
        if e["fill_pct"] is None:  # no echo (as on CPython: test_seeded_fleet_through_gateway_matches_ground_truth)
            assert "sensor_fault" in e["flags"]
        else:
            assert abs(e["fill_pct"] - min(100.0, fleet.truth.readings[(e["device"], e["fcnt"])][0])) <= error_budget_pct(d.bin)
    assert sum(e["fill_pct"] is not None for e in uplinks) >= 0.8 * len(uplinks)


def test_sim_command_writes_registry_and_truth(tmp_path):
    reg, truth = tmp_path / "devices.toml", tmp_path / "truth.json"
    r = subprocess.run([BINLINK, "sim", "--bins", "4", "--speed", "0", "--duration", "7200", "--link",
                        str(tmp_path / "radio0"), "--registry", str(reg), "--seed", "3", "--truth", str(truth),
                        "--linger", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["bins"] == 4 and summary["sent"] >= 8
    assert oct(os.stat(reg).st_mode & 0o777) == "0o600" and "key =" in reg.read_text()
    t = json.loads(truth.read_text())
    assert len(t["bins"]) == 4 and t["readings"]


@pytest.mark.parametrize("embedded", ["mosquitto", "amqtt"])
def test_demo_runs_and_ends_with_its_summary_line(embedded):
    r = subprocess.run([BINLINK, "demo", "--bins", "5", "--seconds", "8", "--embedded", embedded],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    fields = {k: int(v) for k, v in (kv.split("=") for kv in last.split())}
    assert list(fields) == ["bins", "sent", "published", "hellos", "repeated", "lost_on_air", "rejected", "lost_after_gateway"]
    assert fields["bins"] == 5 and fields["published"] > 0
    # every frame sent is accounted for, in frames: the channel's losses are counted independently
    assert fields["sent"] == (fields["published"] + fields["hellos"] + fields["repeated"] + fields["lost_on_air"]
                              + fields["rejected"])
    assert fields["lost_after_gateway"] == 0


def test_ping_physics_speed_of_sound_and_faults():
    s = physics.UltrasonicSensor(random.Random(1), noise_mm=0, p_spurious=0, p_no_echo=0, rh=0.0)
    cold, warm = s.echo_us(1000, -10.0, 60000), s.echo_us(1000, 30.0, 60000)
    assert cold > warm  # sound is slower in the cold: a longer echo for the same distance
    assert abs(cold - 2 * 1000 / physics.speed_of_sound(-10.0, 0.0) * 1000) <= 1
    assert s.echo_us(6000, 20, 60000) == -2  # out of range: no echo
    s.broken = True
    assert s.echo_us(1000, 20, 60000) == -2


def test_speed_of_sound_is_the_physics_own_not_the_firmware_formula():
    assert abs(physics.speed_of_sound(0.0, rh=0.0) - 331.3) < 0.3  # textbook, dry air at 0 °C
    for t in (-10.0, 5.0, 20.0, 35.0):
        dry, humid = physics.speed_of_sound(t, 0.0), physics.speed_of_sound(t, 0.95)
        assert humid > dry  # water vapour is lighter than air
        assert abs(humid - (331.3 + 0.606 * t)) / humid < 0.01  # close to the firmware's line, not on it
    assert physics.speed_of_sound(30.0, 0.95) - physics.speed_of_sound(30.0, 0.0) > 1.0  # humid summer air


def test_installed_bin_differs_from_its_registry_entry():
    """Calibration and mounting errors and a piled surface: the beam sees less distance than the mean level."""
    bins = [physics.Bin(random.Random(s), depth_mm=1200, t0=0.0) for s in range(50)]
    assert all(b.nominal_depth_mm == 1200 for b in bins)
    assert max(abs(b.depth_mm - 1200) for b in bins) > 15 and all(abs(b.depth_mm - 1200) <= 40 for b in bins)
    for b in bins:
        b.level = 0.5
    assert sum(b.surface_mm() < b.mean_surface_mm() for b in bins) > 40  # mostly the pile's peak is nearer
    flat = physics.Bin(random.Random(1), depth_mm=1200, t0=0.0, honest=False)
    flat.level = 0.5
    assert flat.surface_mm() == flat.mean_surface_mm() == 1200 - 0.5 * 950


def test_bin_fills_by_day_and_gets_collected():
    b = physics.Bin(random.Random(3), t0=0.0, days_to_fill=3, collect_every_days=7)
    b.level = 0.0
    b.next_collection = 10 * 86400
    b.advance(86400 * 2)
    assert 0.4 < b.level < 1.0
    night = b.rate_per_s(86400 * 3 + 3 * 3600)
    noon = b.rate_per_s(86400 * 3 + 13 * 3600)
    assert noon > 3 * night
    cols = b.advance(86400 * 11)
    assert len(cols) == 1 and cols[0][1] > 0.9 and b.level < 0.5


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.lists(st.floats(0.0, 9 * 86400.0), max_size=40), st.booleans())
def test_a_bin_fills_the_same_however_often_it_is_looked_at(seed, looks, scheduled):
    """The world does not depend on its observers: a bin advanced at any times in between is where
    a bin advanced once is, with the same pickups, full crossings and overflow (what lets a fixed
    round skip the firmware, and a district run on its own)."""
    def fresh():
        b = physics.Bin(random.Random(seed), t0=1234.5, days_to_fill=1.5)
        b.on_schedule = scheduled
        if not scheduled:
            b.next_collection = math.inf
            b.collect_at(1234.5 + 4.3 * 86400)
        return b

    once, often = fresh(), fresh()
    end = 10 * 86400.0
    pickups = [p for t in sorted(looks) for p in often.advance(1234.5 + t)] + often.advance(end)
    assert pickups == once.advance(end) and pickups
    assert (often.level, often.t, often.full_times, often.overflow_s) == (once.level, once.t, once.full_times, once.overflow_s)
    assert once.full_times and once.overflow_s > 0


def test_scoring_counts_spurious_events_as_well_as_missed_ones():
    from binlink.sim.fleet import Truth

    truth = Truth()
    h = 3600.0
    # one bin, hourly readings: fills to 95 %, collected at 10.5 h, then fills again
    fills = [10 * i if i <= 9 else 95.0 if i == 10 else 2.0 + (i - 11) for i in range(20)]
    for i, fill in enumerate(fills):
        truth.readings[("000101", i + 1)] = (fill, 0.0, i * h)
    truth.collections.append(("bin-1", 10.5 * h, 0.95))

    def ev(kind, fcnt):
        return {"event": kind, "device": "000101", "bin_id": "bin-1", "fcnt": fcnt, "fill_pct": fills[fcnt - 1]}

    events = [ev("emptied", 12), ev("emptied", 16), ev("full", 10), ev("full", 4)]  # one of each is spurious
    s = fidelity.score(truth, None, events, 20 * h)
    assert s["pickup_recall"] == 1.0 and s["pickup_precision"] == 0.5 and s["emptied_spurious"] == 1
    assert s["full_precision"] == 0.5 and s["full_spurious"] == 1
    assert s["full_rises"] == 1 and s["full_recall"] == 1.0
    s = fidelity.score(truth, None, [ev("emptied", 12)], 20 * h)
    assert s["pickup_precision"] == 1.0 and s["full_recall"] == 0.0  # the rise through 90 % was missed
