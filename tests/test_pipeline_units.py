"""Pipeline stages on their own: calibration, events, dedup window, outbox conflation."""
import os

import pytest
from hypothesis import given, settings, strategies as st

from binlink.wire import codec
from binlink.gateway import calibration, events, outbox_feed
from binlink.gateway.config import Events
from binlink.gateway.dedup import Dedup
from binlink.gateway.outbox import Batch, Kind, Message, Outbox
from binlink.gateway.registry import Device

DEV = Device(1, "b", bytes(16), 1200, 200)  # TEST KEY


def r(dist, flags=()):
    return dist, codec.flag_bits(flags)


def test_fill_from_calibration():
    assert calibration.fill_pct(DEV, *r(1200)) == 0.0
    assert calibration.fill_pct(DEV, *r(200)) == 100.0
    assert calibration.fill_pct(DEV, *r(700)) == 50.0
    assert calibration.fill_pct(DEV, *r(1500)) == 0.0  # deeper than the floor: clamped
    assert calibration.fill_pct(DEV, *r(100)) == 100.0  # above full: clamped
    assert calibration.fill_pct(DEV, *r(None, ["sensor_fault"])) is None
    assert calibration.fill_pct(DEV, *r(800, ["sensor_fault"])) is None  # a fault never becomes a level
    assert calibration.fill_pct(DEV, *r(240, ["blind_zone"])) == 100.0


@given(st.integers(0, 65534))
def test_fill_always_in_range(dist):
    assert 0.0 <= calibration.fill_pct(DEV, *r(dist)) <= 100.0


RULES = Events(full_pct=90, emptied_drop_pct=30, low_battery_mv=3300)


@pytest.mark.parametrize("prev_fill,prev_flags,fill,flags,want", [
    (80, 0, 95, [], ["full"]),
    (95, 0, 97, [], []),  # already full: no new event
    (85, 0, 10, [], ["emptied"]),
    (40, 0, 25, [], []),  # a settling of 15 points is not a pickup
    (None, None, 95, [], ["full"]),
    (50, 0, 50, ["fire"], ["fire"]),
    (50, 0x08, 50, ["fire"], []),  # still burning: one event per alarm, not per report
    (50, 0, None, ["sensor_fault"], ["sensor_fault"]),
    (50, 0, 50, ["tilt", "low_battery"], ["tilt", "low_battery"]),
])
def test_events(prev_fill, prev_flags, fill, flags, want):
    assert events.detect(prev_fill, prev_flags, fill, codec.flag_bits(flags), RULES) == want


def test_copies_count_anew_for_another_frame_at_the_same_counter():
    """A re-keyed bin's first frames reuse low counters within the window: their copies are theirs."""
    d = Dedup(30)
    d.remember(1, 5, b"old key's frame", now=100)
    assert [d.heard_again(1, 5) for _ in range(3)] == [1, 2, 3]
    d.remember(1, 5, b"new key's frame", now=101)
    assert d.heard_again(1, 5) == 1


def test_dedup_window():
    d = Dedup(30)
    d.remember(1, 5, b"frame", now=100)
    assert d.is_duplicate(1, 5, b"frame", now=120)
    assert not d.is_duplicate(1, 5, b"other bytes", now=120)  # same counter, other bytes: a replay
    assert not d.is_duplicate(1, 5, b"frame", now=131)
    d.expire(now=131)
    assert not d._seen


def _state(bin_id, fcnt, now):
    return Message("1:%d:state" % fcnt, "binlink/s/bin/%s/state" % bin_id, b"{}", 1, now, Kind.STATE, 1, 0, fcnt, bin_id)


def test_outbox_keeps_only_the_newest_pending_state_per_bin(tmp_path):
    box = Outbox(os.path.join(str(tmp_path), "o.sqlite"))
    for fcnt in (1, 2, 3):
        b = Batch()
        b.messages.append(Message("1:%d" % fcnt, "binlink/s/bin/x/event", b"{}", 0, 1.0))
        b.states["x"] = _state("x", fcnt, 1.0)
        box.commit(b)
    pending = [(t, bool(ret)) for _, t, _, ret, _ in box.pending(0, 100)]
    assert pending == [("binlink/s/bin/x/event", False)] * 3 + [("binlink/s/bin/x/state", True)]
    assert box.depth() == 4


def test_rejection_logging_is_rate_limited(caplog):
    import logging

    from binlink.gateway.logs import RateLimit

    rl = RateLimit(per_minute=3)
    allowed = [rl.allow("crc", now=100 + i) for i in range(10)]
    assert allowed == [True] * 3 + [False] * 7
    assert rl.allow("bad_tag", now=105)  # another reason has its own budget
    with caplog.at_level(logging.WARNING, logger="binlink.logs"):
        assert rl.allow("crc", now=161)
    assert any(getattr(r, "fields", {}).get("suppressed") == 7 for r in caplog.records)


def test_outbox_commit_and_ack_report_the_change_in_pending(tmp_path):
    """The depth gauge follows these numbers instead of counting the table on every group."""
    box = Outbox(os.path.join(str(tmp_path), "o.sqlite"))
    b = Batch()
    b.messages.append(Message("1:1", "binlink/s/bin/x/event", b"{}", 0, 1.0))
    b.states["x"] = _state("x", 1, 1.0)
    assert box.commit(b) == 2 and box.depth() == 2
    first_state = [r[0] for r in box.pending(0, 10) if r[3]]
    b = Batch()
    b.states["x"] = _state("x", 2, 1.0)
    assert box.commit(b) == 0 and box.depth() == 2  # the new state replaced the pending one
    assert box.ack(first_state) == 0  # superseded already: not counted twice
    ids = [r[0] for r in box.pending(0, 10)]
    assert box.ack(ids) == 2 and box.depth() == 0


def test_time_synced_follows_the_clock_as_it_syncs(tmp_path, monkeypatch):
    """A Pi has no RTC: it often starts the gateway before NTP has synchronised the clock."""
    from binlink.wire import codec
    from binlink.gateway import config, pipeline
    from binlink.gateway.metrics import Metrics
    from binlink.gateway.module_formats import Reception

    key = bytes(range(16))  # TEST KEY
    cfg = config.parse({"gateway": {"id": "g", "site": "s", "registry": "r", "state_dir": "d"}, "source": [{"port": "/x"}]})
    box = Outbox(os.path.join(str(tmp_path), "o.sqlite"))
    p = pipeline.Pipeline(cfg, {1: Device(1, "b", key, 1200, 200)}, box, Metrics())
    synced = [False]
    monkeypatch.setattr(pipeline, "clock_synced", lambda: synced[0])
    import json

    def state_after(fcnt):
        p.process([("r0", Reception(codec.encode_reading(key, 1, fcnt, 700, 20, 3700)))])
        rows = [r for r in outbox_feed.rendered(box.pending(0, 100)) if r[3]]
        return json.loads(rows[-1][2])["time_synced"]

    assert state_after(1) is False
    synced[0] = True
    assert state_after(2) is True


def _pipeline(tmp_path):
    from binlink.gateway import config
    from binlink.gateway.metrics import Metrics
    from binlink.gateway.pipeline import Pipeline

    cfg = config.parse({"gateway": {"id": "g", "site": "s", "registry": "r", "state_dir": "d"}, "source": []})
    box = Outbox(str(tmp_path / "o.sqlite"))
    return Pipeline(cfg, {DEV.device_id: DEV}, box, Metrics()), box


def _rec(frame):
    from binlink.gateway.module_formats import Reception

    return ("radio0", Reception(frame))


def test_a_counter_jump_past_the_gap_limit_is_taken_up_from_two_frames(tmp_path):
    """A bin that jumped more than 16 384 ahead (fcnt_gap for ever, before): its first frame is
    held, the second reveals the counter, both are accepted; nothing at or below the old counter."""
    from binlink.wire import codec

    p, box = _pipeline(tmp_path)
    enc = lambda n: codec.encode_reading(DEV.key, 1, n, 700, 20, 3700, 0, 5, 5)  # noqa: E731
    assert p.process([_rec(enc(5))]) == 1
    assert p.process([_rec(enc(40000))]) == 0
    assert p.metrics.value("binlink_frames_rejected_total", reason="fcnt_gap") == 1
    assert p.process([_rec(enc(40001))]) == 2  # both readings
    assert p.counters[1] == 40001 and p.metrics.value("binlink_frames_recovered_total") == 2
    assert p.process([_rec(enc(3))]) == 0  # an old frame is still refused
    keys = {k for (k,) in box.db.execute("SELECT message_key FROM outbox")}
    assert {"000001:0:40000", "000001:0:40001"} <= keys and "000001:0:3" not in keys


def test_a_forged_pair_does_not_resynchronise(tmp_path):
    from binlink.wire import codec

    p, _ = _pipeline(tmp_path)
    wrong = bytes(range(16))  # TEST KEY, not the device's
    for n in (70000, 70001, 70002):
        assert p.process([_rec(codec.encode_reading(wrong, 1, n, 700, 20, 3700, 0, 5, 5))]) == 0
    assert p.metrics.value("binlink_frames_rejected_total", reason="bad_tag") == 3
    assert 1 not in p.counters and p.metrics.value("binlink_counter_resyncs_total") == 0


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 3), st.sampled_from([b"a", b"b"]),
                          st.floats(0, 20)), max_size=60))
@settings(max_examples=400)
def test_dedup_answers_as_a_plain_window_would(ops):
    """Against the obvious model: (device, fcnt) -> (bytes, first seen), a duplicate while within the window."""
    d, model, now = Dedup(30), {}, 0.0
    for remember, dev, fcnt, frame, step in ops:
        now += step
        if remember:
            d.remember(dev, fcnt, frame, now)
            first = model.get((dev, fcnt), (None, -1e9))[1]
            model[(dev, fcnt)] = (frame, first if now - first <= 30 else now)
        else:
            want = (dev, fcnt) in model and model[(dev, fcnt)][0] == frame and now - model[(dev, fcnt)][1] <= 30
            assert d.is_duplicate(dev, fcnt, frame, now) == want


def test_copies_of_a_frame_store_a_bounded_number_of_receptions(tmp_path):
    """20,000 copies over Wi-Fi cost no disk: the first few are stored as receptions, all counted."""
    from binlink.wire import codec
    from binlink.gateway.pipeline import RECEPTIONS_KEPT

    p, box = _pipeline(tmp_path)
    frame = codec.encode_reading(DEV.key, 1, 5, 700, 20, 3700, 0, 5, 5)
    assert p.process([_rec(frame)]) == 1
    for _ in range(4):
        p.process([_rec(frame)] * 500)
    assert box.db.execute("SELECT COUNT(*) FROM receptions").fetchone()[0] == RECEPTIONS_KEPT
    assert p.metrics.value("binlink_duplicates_total") == 2000


@pytest.mark.parametrize("forged_first,decoys", [(False, 0), (True, 0), (True, 16)])
def test_ten_forged_frames_per_report_do_not_keep_a_bin_from_resynchronising(forged_first, decoys):
    """A forger follows (or precedes) each report of a bin this gateway lost track of with ten
    forged frames naming it, and as many naming each of 16 decoy bins: the bin is placed again
    from its second report, as without a forger."""
    from tests.bench_resync import reports_needed

    assert reports_needed(forged_per_report=10, decoys=decoys, forged_first=forged_first) <= 3


def test_forged_frames_naming_1000_bins_are_held_within_a_memory_bound():
    from binlink.gateway.resync import HELD_TOTAL
    from tests.bench_resync import held_frames_mb

    mb, held = held_frames_mb(bins=1000, frames_per_bin=10)
    assert held == HELD_TOTAL and mb <= 16


def test_a_forged_hello_naming_its_counter_is_not_held(tmp_path):
    """A version 2 hello verifies on its own: one that does not is forged, nothing to wait for."""
    from binlink.wire import codec

    p, _ = _pipeline(tmp_path)
    p.process([_rec(codec.encode_hello(bytes(range(16)), 1, 70000, (1, 0, 0), 1, bytes(4)))])  # TEST KEY, not the device's
    assert p.metrics.value("binlink_frames_rejected_total", reason="bad_tag") == 1 and len(p.resync) == 0


def test_a_fleet_counter_alone_moves_no_counter_here(tmp_path):
    """Several gateways: a counter in Redis far above this gateway's (a Redis writer's) is used only
    to verify a frame this gateway cannot; a forged frame that does not verify at it either leaves
    the local counter alone, so the bin's next genuine frame is still accepted."""
    from binlink.gateway import config, pipeline
    from binlink.gateway.metrics import Metrics
    from binlink.gateway.module_formats import Reception

    class Fleet:  # the shared state as a Redis writer left it: bin 0xA1's counter raised
        def last(self, device):
            return 40_000

        def claim_many(self, frames, ttl_s):
            return [("ok", None)] * len(frames)

        def confirm(self, claims):
            pass

        def remember(self, device, fcnt):
            pass

        def is_duplicate(self, device, fcnt, digest):
            return False

    cfg = config.parse({"gateway": {"id": "g", "site": "s", "registry": "r", "state_dir": str(tmp_path)},
                        "source": [{"port": "/x"}]})
    key = bytes(range(16))  # TEST KEY
    dev = Device(0xA1, "bin-a", key, 1200, 200)
    p = pipeline.Pipeline(cfg, {0xA1: dev}, Outbox(os.path.join(str(tmp_path), "o.sqlite")), Metrics(), shared=Fleet())
    assert p.process([("r0", Reception(codec.encode_reading(key, 0xA1, 1, 700, 20, 3700, 0, 5, 5)))]) == 1
    forged = bytearray(codec.encode_reading(key, 0xA1, 2, 700, 20, 3700, 0, 5, 5))
    forged[-1] ^= 0xFF  # a bad tag: verified against the fleet's counter too, and refused
    assert p.process([("r0", Reception(bytes(forged)))]) == 0
    assert p.counters[0xA1] == 1
    assert p.process([("r0", Reception(codec.encode_reading(key, 0xA1, 2, 700, 20, 3700, 0, 5, 5)))]) == 1
