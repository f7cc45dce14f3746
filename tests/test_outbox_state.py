"""The outbox and start-up recovery on their own: counters and bin states through a crash, a full
disk, salvage around a damaged page, counters from retained states, the clock check."""
import json
import os
import sqlite3
import subprocess

import pytest
from hypothesis import given, strategies as st

from binlink.wire import codec
from binlink.gateway import config, recovery, retained, storage
from binlink.gateway.salvage import salvage
from binlink.gateway.clock import RELEASED, ClockCheck
from binlink.gateway.metrics import Metrics
from binlink.gateway.module_formats import Reception
from binlink.gateway.heads import BinState, Counter
from binlink.gateway.outbox import Batch, Kind, Message, Outbox, StorageFull
from binlink.gateway.pipeline import Pipeline
from binlink.gateway.registry import Device
from tests.harness import fill_volume

KEY_A, KEY_B, KEY_A2 = bytes(range(16)), bytes([7]) * 16, bytes([9]) * 16  # TEST KEYS
CFG = config.parse({"gateway": {"id": "g", "site": "s", "registry": "r", "state_dir": "d"}, "source": [{"port": "/x"}]})


def _devices(key_a=KEY_A):
    return {0xA1: Device(0xA1, "bin-a", key_a, 1200, 200), 0xB2: Device(0xB2, "bin-b", KEY_B, 1000, 100)}


def _reading(key, dev, fcnt, dist=700, flags=0):
    return Reception(codec.encode_reading(key, dev, fcnt, dist, 20, 3700, flags, 5, 5))


def _crash_and_reopen(box):
    box.db.close()  # no Outbox.close(): what a power cut leaves is what was committed
    return Outbox(box.path)


def _close_cleanly(box):
    """Everything in the file, its WAL gone: the file as a clean stop leaves it (damaged after)."""
    box.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    box.db.close()
    storage.mark_closed(box.path)


def test_counters_and_bin_states_survive_a_crash_between_saves(tmp_path):
    box = Outbox(str(tmp_path / "o.sqlite"))
    p = Pipeline(CFG, _devices(), box, Metrics())
    for n in range(1, 31):
        p.process([("r0", _reading(KEY_A, 0xA1, n, dist=1100 - 20 * n, flags=codec.F_TILT if n == 20 else 0))])
    p.process([("r0", Reception(codec.encode_hello(KEY_B, 0xB2, 5, (1, 0, 0), 1, b"\0\0\0\0")))])
    body = codec.pack_reading(650, 20, 3700, 0, 5, 5)
    p.process([("r0", Reception(codec.encode_backlog(KEY_A, 0xA1, 40, [(38, 4, body), (39, 2, body)])))])
    p.process([("r0", _reading(KEY_A, 0xA1, 41, dist=0xFFFF))])  # sensor fault: the bin keeps its level
    stored = box.db.execute("SELECT last_fcnt FROM counters WHERE device_id = ?", (0xA1,)).fetchone()[0]
    assert stored < 41  # the rows carried it: the counters table was not written for every reading
    reopened = _crash_and_reopen(box)
    # the counters and which readings below them are stored (the backlog's 38 and 39 among them)
    assert reopened.counters() == {0xA1: Counter(41, _devices()[0xA1].key_id, 0, p.stored[0xA1]),
                                   0xB2: Counter(5, _devices()[0xB2].key_id, 0, p.stored[0xB2])}
    stored = [41 - k for k in range(64) if p.stored[0xA1] >> k & 1]
    assert sorted(stored) == list(range(1, 31)) + [38, 39, 41]  # 40 is the batch itself, no reading
    assert reopened.bins() == p.bins
    # a re-provisioned bin (new key, counter from 1): the old key's rows must not raise its counter
    p2 = Pipeline(CFG, _devices(KEY_A2), reopened, Metrics())
    p2.process([("r0", _reading(KEY_A2, 0xA1, 1)), ("r0", _reading(KEY_A2, 0xA1, 2))])
    assert _crash_and_reopen(reopened).counters()[0xA1] == Counter(2, _devices(KEY_A2)[0xA1].key_id, 0, 0b11)


def test_a_commit_on_a_full_disk_raises_storage_full_and_leaves_nothing_open(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("a full disk is tested on a small tmpfs, which only root can mount")
    d = tmp_path / "disk"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        box = Outbox(str(d / "o.sqlite"))
        filler = fill_volume(d)
        big = Batch()
        big.messages = [Message("1:%d" % n, "t/bin/x/event", os.urandom(300), 0, 1.0) for n in range(1500)]
        with pytest.raises(StorageFull):
            box.commit(big)
        assert not box.db.in_transaction and box.depth() == 0
        os.unlink(filler)
        assert box.commit(big) == 1500
        box.close()
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_salvage_reads_around_a_damaged_page(tmp_path):
    path = str(tmp_path / "o.sqlite")
    box = Outbox(path)
    for n in range(1, 1001):
        b = Batch()
        b.messages.append(Message("0000a1:0:%d" % n, "t/bin/a/event", os.urandom(200), 0, 1.0, Kind.UPLINK, 0xA1, 0, n))
        b.counters[0xA1] = Counter(n, "k", 0)
        box.commit(b)
    box.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    box.close()
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2 // 1024 * 1024)
        f.write(b"\xff" * 2048)
    assert recovery.check(path) is not None
    rows = salvage(path)
    ids = [r[0] for r in rows["outbox"]]
    assert 900 < len(ids) < 1000 and len(set(ids)) == len(ids)
    assert [r[0] for r in rows["counters"]] == [0xA1]


def _valid(states, devices, now=None):
    """Retained (bin, state dict) pairs through the parser, as recovery reads them."""
    now = retained._parse_time("2026-12-02T00:00:00.000Z") if now is None else now
    return retained.valid_states(CFG, [(b, json.dumps(s).encode()) for b, s in states], devices, Metrics(), now)


def test_counters_from_retained_states_skip_other_bins_and_reprovisioned_ones():
    devices = _devices()
    states = [
        ("bin-a", {"device": "0000a1", "fcnt": 70000, "key_epoch": 0, "fill_pct": 40.0, "flags": ["tilt"],
                   "received_at": "2026-12-01T10:00:00.000Z", "time_synced": True}),
        ("bin-b", {"device": "0000b2", "fcnt": 900, "key_epoch": 0, "fill_pct": None, "flags": [],
                   "received_at": "2026-12-01T09:00:00.000Z", "time_synced": False}),
        ("bin-x", {"device": "0000ff", "fcnt": 5, "key_epoch": 0, "fill_pct": None, "flags": [],
                   "received_at": "2026-12-01T11:00:00.000Z", "time_synced": True}),
        ("bin-b", {"device": "garbage"}),
    ]
    local_bins = {"bin-b": BinState(0, 3, 10.0, 0, retained._parse_time("2026-12-01T09:30:00.000Z"))}  # newer, lower: re-provisioned
    valid = _valid(states, devices)
    counters, bins = retained.counters_from_states(valid, local_bins)
    assert counters == {0xA1: Counter(70000, devices[0xA1].key_id, 0)}
    assert bins == {"bin-a": BinState(0, 70000, 40.0, codec.F_TILT, retained._parse_time("2026-12-01T10:00:00.000Z"))}
    assert retained.newest_synced_time(valid) == retained._parse_time("2026-12-01T10:00:00.000Z")  # bin-x is not ours


def test_a_state_counts_only_under_the_key_epoch_its_device_has_now():
    rekeyed = {0xA1: Device(0xA1, "bin-a", KEY_A2, 1200, 200, key_epoch=1)}
    old_key = {"device": "0000a1", "fcnt": 40004, "key_epoch": 0, "fill_pct": 10, "flags": [],
               "received_at": "2026-12-01T10:00:00.000Z", "time_synced": True}
    before_epochs = dict(old_key)
    del before_epochs["key_epoch"]
    for state in (old_key, before_epochs):
        assert retained.counters_from_states(_valid([("bin-a", state)], rekeyed), {}) == ({}, {})
    # a device never re-keyed: a state from before epochs were published can only be of its key
    counters, _ = retained.counters_from_states(_valid([("bin-a", before_epochs)], _devices()), {})
    assert counters == {0xA1: Counter(40004, _devices()[0xA1].key_id, 0)}
    new_key = dict(old_key, key_epoch=1, fcnt=4)
    counters, _ = retained.counters_from_states(_valid([("bin-a", new_key), ("bin-a", old_key)], rekeyed), {})
    assert counters == {0xA1: Counter(4, rekeyed[0xA1].key_id, 1)}


def test_clock_check_flags_a_clock_before_the_release_or_behind_the_broker(caplog):
    m = Metrics()
    c = ClockCheck(m)
    assert c.plausible(RELEASED + 86400) and m.value("binlink_clock_suspect") == 0
    assert not c.plausible(RELEASED - 3 * 365 * 86400) and m.value("binlink_clock_suspect") == 1
    assert not c.plausible(RELEASED - 3 * 365 * 86400 + 60)
    assert sum("cannot be right" in r.getMessage() for r in caplog.records) == 1  # said once, not per frame
    c.broker_time = RELEASED + 10 * 86400
    assert not c.plausible(RELEASED + 86400)
    assert c.plausible(RELEASED + 10 * 86400 + 5) and m.value("binlink_clock_suspect") == 0


def test_a_state_file_from_before_opens_with_its_counters_and_pending_rows(tmp_path):
    """An upgrade: the old schema (AUTOINCREMENT, pending indexes, counters written every commit)."""
    path = str(tmp_path / "o.sqlite")
    db = sqlite3.connect(path)
    db.executescript("""
        PRAGMA journal_mode=WAL;
        CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, message_key TEXT NOT NULL UNIQUE, topic TEXT NOT NULL,
            payload TEXT NOT NULL, retain INTEGER NOT NULL, received_at REAL NOT NULL, acked_at REAL,
            superseded INTEGER NOT NULL DEFAULT 0);
        CREATE INDEX outbox_pending ON outbox(id) WHERE acked_at IS NULL;
        CREATE TABLE counters (device_id INTEGER PRIMARY KEY, last_fcnt INTEGER NOT NULL, key_id TEXT NOT NULL);
        CREATE TABLE bins (bin_id TEXT PRIMARY KEY, fcnt INTEGER NOT NULL, fill_pct REAL, flags INTEGER NOT NULL,
            updated_at REAL NOT NULL);
        INSERT INTO outbox(message_key, topic, payload, retain, received_at) VALUES ('0000a1:7', 't/bin/a/event', '{}', 0, 1.0);
        INSERT INTO counters VALUES (161, 7, 'k');
        INSERT INTO bins VALUES ('a', 7, 10.0, 0, 1.0);
    """)
    db.close()
    box = Outbox(path)
    assert box.counters() == {0xA1: Counter(7, "k", None)} and box.bins() == {"a": BinState(None, 7, 10.0, 0, 1.0)}
    assert [r[0] for r in box.pending(0, 10)] == [1]
    indexes = {r[0] for r in box.db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "outbox_pending" not in indexes and "outbox_event_key" not in indexes  # the old UNIQUE serves
    b = Batch()
    b.messages.append(Message("0000a1:0:8", "t/bin/a/event", b"{}", 0, 2.0, Kind.UPLINK, 0xA1, 0, 8))
    b.counters[0xA1] = Counter(8, "k", 0)
    assert box.commit(b) == 1 and box.ack([1, 2]) == 2
    assert _crash_and_reopen(box).counters() == {0xA1: Counter(8, "k", 0, 0b1)}  # its row says reading 8 is stored


def test_heads_saved_on_schedule_are_the_same_as_carried_by_rows(tmp_path, monkeypatch):
    from binlink.gateway import outbox

    monkeypatch.setattr(outbox, "SAVE_HEADS_S", 0.0)  # every commit is a scheduled save
    box = Outbox(str(tmp_path / "o.sqlite"))
    p = Pipeline(CFG, _devices(), box, Metrics())
    for n in range(1, 11):
        p.process([("r0", _reading(KEY_A, 0xA1, n, dist=1100 - 50 * n)), ("r0", _reading(KEY_B, 0xB2, n))])
    assert box.db.execute("SELECT device_id, last_fcnt FROM counters ORDER BY device_id").fetchall() == [(0xA1, 10), (0xB2, 10)]
    assert _crash_and_reopen(box).bins() == p.bins


def test_deferred_acks_ride_with_the_next_commit_and_a_crash_before_only_republishes(tmp_path):
    box = Outbox(str(tmp_path / "o.sqlite"))

    def batch(n):
        b = Batch()
        b.messages.append(Message("0000a1:0:%d" % n, "t/bin/a/event", b"{}", 0, float(n)))
        return b

    assert box.commit(batch(1)) == 1
    assert box.defer_acks([1]) == 1 and box.defer_acks([1]) == 0  # the broker has it (once)
    assert box.acks_waiting == 1 and box.depth() == 1  # not written yet
    crashed = _crash_and_reopen(box)
    assert [r[0] for r in crashed.pending(0, 10)] == [1]  # a power cut now: message 1 is sent again
    box = crashed
    assert box.defer_acks([1]) == 1
    assert box.commit(batch(2)) == 1  # one new pending; the acknowledged one written in the same transaction
    assert box.acks_waiting == 0
    assert [r[0] for r in _crash_and_reopen(box).pending(0, 10)] == [2]


def test_deferred_acks_are_written_alone_when_no_commit_comes_and_at_close(tmp_path):
    box = Outbox(str(tmp_path / "o.sqlite"))
    b = Batch()
    b.messages += [Message("0000a1:0:%d" % n, "t/bin/a/event", b"{}", 0, float(n)) for n in (1, 2)]
    assert box.commit(b) == 2
    box.defer_acks([1])
    box.write_acks()
    assert box.acks_waiting == 0 and box.depth() == 1
    box.defer_acks([2])
    box.close()
    assert Outbox(box.path).depth() == 0


def test_a_state_superseded_while_its_ack_waits_is_counted_off_once(tmp_path):
    box = Outbox(str(tmp_path / "o.sqlite"))

    def state(n):
        b = Batch()
        b.states["a"] = Message("0000a1:0:%d:state" % n, "t/bin/a/state", b"{}", 1, float(n))
        return b

    depth = box.commit(state(1))
    depth -= box.defer_acks([1])  # published, the ack not written yet
    depth += box.commit(state(2))  # supersedes state 1 in the same transaction that writes its ack
    assert depth == box.depth() == 1
    assert box.defer_acks([1]) == 0  # reported again after a reconnect: not counted again


@given(st.one_of(st.binary(max_size=2000).filter(lambda b: b[:1] != b"\x02"), st.text(max_size=500)))
def test_stored_payloads_read_back_as_written(payload):
    """Any payload but a reading's record (0x02, tests/test_integrate.py): the gateway's are JSON or text."""
    from binlink.gateway.payloads import pack, unpack

    raw = payload.encode() if isinstance(payload, str) else payload
    assert unpack(pack(payload)) == raw


def test_rows_packed_by_an_earlier_release_still_read_back():
    import zlib

    from binlink.gateway import payloads as outbox

    body = b'{"event":"uplink","fcnt":7,"bin_id":"bin-a","fill_pct":42.5}'
    c = zlib.compressobj(6, zlib.DEFLATED, -10, 2, zdict=outbox._ZDICT_V1)  # as 0.2 wrote them
    assert outbox.unpack(b"\x00" + c.compress(body) + c.flush()) == body
    assert outbox.unpack('{"plain": "json"}') == '{"plain": "json"}'  # before payloads were packed
    state = b'{"battery_v":3.7,"bin_id":"bin-a","fill_rate_pct_per_day":12.5,"full_at":null,"lat":52.1,"name":"A"}'
    assert len(outbox.pack(state)) < len(b"\x00" + zlib.compress(state))  # the dictionary earns its keep


@given(st.lists(st.integers(1, 300), max_size=200))
def test_acknowledged_ids_written_as_runs_cover_exactly_those_ids(ids):
    from binlink.gateway.outbox import runs

    covered = [i for first, last in runs(ids) for i in range(first, last + 1)]
    assert covered == sorted(set(ids))
    assert all(b[0] > a[1] + 1 for a, b in zip(runs(ids), runs(ids)[1:]))  # as few runs as can be


def test_a_0_3_state_file_with_a_retired_bins_rows_is_migrated_once(tmp_path):
    """0.3 carried counters by parsing message keys; a retired bin's clearing rows ("retire:...")
    made every start fail. Migrated: the counters its rows carried are in their tables, the file
    says its format, and a second open changes nothing."""
    path = str(tmp_path / "o.sqlite")
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE outbox (id INTEGER PRIMARY KEY, message_key TEXT NOT NULL, topic TEXT NOT NULL, payload TEXT NOT NULL,
            retain INTEGER NOT NULL, received_at REAL NOT NULL, acked_at REAL, superseded INTEGER NOT NULL DEFAULT 0);
        CREATE UNIQUE INDEX outbox_event_key ON outbox(message_key) WHERE retain = 0;
        CREATE TABLE counters (device_id INTEGER PRIMARY KEY, last_fcnt INTEGER NOT NULL, key_id TEXT NOT NULL,
            upto_id INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE bins (bin_id TEXT PRIMARY KEY, fcnt INTEGER NOT NULL, fill_pct REAL, flags INTEGER NOT NULL,
            updated_at REAL NOT NULL, upto_id INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
        INSERT INTO counters VALUES (161, 3, 'k', 0), (178, 9, 'k2', 0);
        INSERT INTO bins VALUES ('a', 3, 10.0, 0, 1.0, 0), ('b', 9, 50.0, 0, 1.0, 0);
        INSERT INTO outbox(message_key, topic, payload, retain, received_at) VALUES
            ('0000a1:0:4', 't/bin/a/event', '{}', 0, 2.0),
            ('0000a1:0:4:state', 't/bin/a/state', '{"fill_pct": 20.0, "flags": ["tilt"]}', 1, 2.0),
            ('retire:0000b2:0:t/bin/b/state', 't/bin/b/state', '', 1, 3.0),
            ('rejected:0000ff:bad_tag:1000', 't/gateway/g/rejected', '{}', 0, 3.0);
    """)
    db.close()
    box = Outbox(path)
    assert box.counters() == {0xA1: Counter(4, "k", None), 0xB2: Counter(9, "k2", None)}
    assert box.bins() == {"a": BinState(None, 4, 20.0, codec.F_TILT, 2.0), "b": BinState(None, 9, 50.0, 0, 1.0)}
    assert box.db.execute("PRAGMA user_version").fetchone()[0] == 1
    assert [r[0] for r in box.pending(0, 10)] == [1, 2, 3, 4]  # still published
    box.close()
    again = Outbox(path)
    assert again.counters()[0xA1] == Counter(4, "k", None) and again.bins()["a"].fcnt == 4


def test_a_rekeyed_bin_keeps_its_new_state_through_a_power_cut(tmp_path):
    """Key epochs in the rows: after a re-key the new key's low counters are the bin's newest
    readings, before and after a restart (0.3 compared counters alone and froze the bin's state)."""
    box = Outbox(str(tmp_path / "o.sqlite"))
    old = {0xA1: Device(0xA1, "bin-a", KEY_A, 1200, 200)}
    p = Pipeline(CFG, old, box, Metrics())
    p.process([("r0", _reading(KEY_A, 0xA1, n, dist=1000)) for n in range(1, 41)])
    new = {0xA1: Device(0xA1, "bin-a", KEY_A2, 1200, 200, key_epoch=1)}
    p.set_devices(new)
    p.process([("r0", _reading(KEY_A2, 0xA1, 1, dist=300))])
    assert p.bins["bin-a"][:2] == (1, 1)
    reopened = _crash_and_reopen(box)
    assert reopened.bins()["bin-a"][:2] == (1, 1)
    p2 = Pipeline(CFG, new, reopened, Metrics())
    p2.process([("r0", _reading(KEY_A2, 0xA1, 2, dist=1100))])  # emptied: compared with the new key's reading
    assert p2.bins["bin-a"][:2] == (1, 2)
    kinds = [k for (k,) in reopened.db.execute("SELECT message_key FROM outbox WHERE kind = ?", (Kind.ALARM,))]
    assert kinds == ["0000a1:1:1:full", "0000a1:1:2:emptied"]


def test_an_old_registry_backup_restored_after_a_rekey_accepts_no_recorded_old_key_frame(tmp_path, caplog):
    """A backup from before a re-key names the old key at the old epoch: the entry is refused and
    said, so recorded frames of the old key are not accepted again and the state does not roll back."""
    box = Outbox(str(tmp_path / "o.sqlite"))
    old = {0xA1: Device(0xA1, "bin-a", KEY_A, 1200, 200), 0xB2: Device(0xB2, "bin-b", KEY_B, 1000, 100)}
    recorded = [_reading(KEY_A, 0xA1, n, dist=1000) for n in range(1, 6)]
    p = Pipeline(CFG, old, box, Metrics())
    p.process([("r0", rec) for rec in recorded])
    p.set_devices({0xA1: Device(0xA1, "bin-a", KEY_A2, 1200, 200, key_epoch=1), 0xB2: old[0xB2]})
    p.process([("r0", _reading(KEY_A2, 0xA1, 1, dist=300))])
    reopened = _crash_and_reopen(box)
    metrics = Metrics()
    p2 = Pipeline(CFG, old, reopened, metrics)  # the backup restored, then a restart
    refused = [r.fields for r in caplog.records if r.getMessage().startswith("registry entry refused")]
    assert [(f["bin"], f["registry_key_epoch"], f["state_key_epoch"]) for f in refused] == [("bin-a", 0, 1)]
    assert p2.process([("r0", rec) for rec in recorded]) == 0
    assert metrics.value("binlink_frames_accepted_total") == 0
    assert p2.bins["bin-a"][:2] == (1, 1)  # the re-keyed bin's newest reading stays its state
    assert p2.process([("r0", _reading(KEY_B, 0xB2, 1))]) == 1  # every other bin is heard


def test_a_backlog_entry_repeating_a_stored_reading_is_stored_once_through_a_power_cut(tmp_path):
    """A bin whose transport said a send failed keeps the reading for its backlog, though the
    gateway heard it: the entry is not stored (nor published) again, before or after a restart.
    What tells is the counter's window of stored readings, carried by the rows between saves."""
    box = Outbox(str(tmp_path / "o.sqlite"))
    p = Pipeline(CFG, _devices(), box, Metrics())
    p.process([("r0", _reading(KEY_A, 0xA1, n, dist=800)) for n in (1, 2)])  # 3 never arrives
    body = codec.pack_reading(650, 20, 3700, 0, 5, 5)
    batch = Reception(codec.encode_backlog(KEY_A, 0xA1, 4, [(2, 10, body), (3, 5, body)]))  # 2 (stored) and 3
    assert p.process([("r0", batch)]) == 1
    uplinks = "SELECT message_key FROM outbox WHERE kind = %d ORDER BY id" % Kind.UPLINK
    assert [k for (k,) in box.db.execute(uplinks)] == ["0000a1:0:1", "0000a1:0:2", "0000a1:0:3"]
    reopened = _crash_and_reopen(box)
    p2 = Pipeline(CFG, _devices(), reopened, Metrics())
    again = Reception(codec.encode_backlog(KEY_A, 0xA1, 6, [(2, 20, body), (3, 15, body), (5, 2, body)]))  # 2, 3 and 5
    assert p2.process([("r0", again)]) == 1
    assert [k for (k,) in reopened.db.execute(uplinks)] == ["0000a1:0:1", "0000a1:0:2", "0000a1:0:3", "0000a1:0:5"]
    assert p2.metrics.value("binlink_duplicates_total") == 2


def test_an_echo_stores_the_reading_its_own_frame_lost_once_and_as_late(tmp_path):
    """Firmware 1.7.0's reading frame repeats its predecessor. Reading 2 is lost on air: frame 3's
    echo brings it (published as late, before 3, counted in binlink_echo_saved); frame 4's echo of
    the stored 3 is dropped without a word (the common case: not a duplicate); through a power cut
    too. The ack window names 2 stored, so the bin will not send it again."""
    box = Outbox(str(tmp_path / "o.sqlite"))
    p = Pipeline(CFG, _devices(), box, Metrics())
    body = lambda dist: codec.pack_reading(dist, 20, 3700, 0, 5, 5)  # noqa: E731
    echoing = lambda fcnt, dist, prev: Reception(codec.encode_reading_body(KEY_A, 0xA1, fcnt, body(dist), [(fcnt - 1, 15, body(prev))]))  # noqa: E731
    assert p.process([("r0", _reading(KEY_A, 0xA1, 1, dist=900))]) == 1
    assert p.process([("r0", echoing(3, 860, 880))]) == 2  # 2 was lost on air
    assert p.stored[0xA1] & 0b111 == 0b111  # 3, 2 and 1 stored: the next answer acknowledges 2
    reopened = _crash_and_reopen(box)
    p2 = Pipeline(CFG, _devices(), reopened, Metrics())
    assert p2.process([("r0", echoing(4, 840, 860))]) == 1
    from binlink.gateway.payloads import unpack

    rows = [(k, json.loads(unpack(v))) for k, v in reopened.db.execute("SELECT message_key, payload FROM outbox WHERE kind = %d ORDER BY id"
                                                                % Kind.UPLINK)]
    assert [k for k, _ in rows] == ["0000a1:0:1", "0000a1:0:2", "0000a1:0:3", "0000a1:0:4"]
    assert [r["distance_mm"] for _, r in rows] == [900, 880, 860, 840] and [r["backlog"] for _, r in rows] == [False, True, False, False]
    assert p.metrics.value("binlink_echo_saved_total") == 1 and p.metrics.value("binlink_duplicates_total") == 0
    assert p2.metrics.value("binlink_echo_saved_total") == 0 and p2.metrics.value("binlink_duplicates_total") == 0
    assert reopened.bins()["bin-a"][:2] == (0, 4)
    # a batch of readings stored already (the bin's answer was lost): accepted, nothing published, counted
    assert p2.process([("r0", Reception(codec.encode_backlog(KEY_A, 0xA1, 6, [(2, 60, body(880)), (3, 45, body(860))])))]) == 0
    assert p2.metrics.value("binlink_frames_repeated_total") == 1 and p2.metrics.value("binlink_duplicates_total") == 2


def test_a_state_file_of_a_newer_release_is_refused_not_guessed_at(tmp_path):
    path = str(tmp_path / "o.sqlite")
    Outbox(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(sqlite3.DatabaseError, match="written by a newer binlink"):
        Outbox(path)


# damaged or lost state, at start (issue 18) -----------------------------------------------
def _no_broker(monkeypatch):
    monkeypatch.setattr(recovery, "retained_states", lambda cfg, wait: None)  # unreachable: no help from it


def _pending_file(path, n, devices=None):
    """A state file as a crash leaves it after n readings of bin-a accepted with the broker down."""
    box = Outbox(path)
    p = Pipeline(CFG, devices or _devices(), box, Metrics())
    for fcnt in range(1, n + 1):
        p.process([("r0", _reading(KEY_A, 0xA1, fcnt, dist=300 + fcnt % 500))])
    return box


def _open_state(path):
    import threading
    m = Metrics()
    box, report = recovery.open_state(CFG, path, _devices(), m, threading.Event())
    return box, report, m


def test_a_state_file_cut_to_half_gives_back_the_pending_rows_of_its_first_half(tmp_path, monkeypatch):
    _no_broker(monkeypatch)
    path = str(tmp_path / "o.sqlite")
    box = _pending_file(path, 1000)
    pending = box.depth()
    _close_cleanly(box)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    box, report, m = _open_state(path)
    assert report.problems == ["state_file_damaged"]
    # measured: 489 of the 1,003 pending rows (1,000 events, 3 states) come back, 977 rows in all:
    # the first half of the file. Before the padded copy, none did (SQLite refuses a b-tree that
    # points past the end of the file)
    assert pending == 1003 and report.salvaged["pending"] >= 450
    assert box.depth() == report.salvaged["pending"]
    assert m.value("binlink_state_salvaged_rows_total", table="outbox") == report.salvaged["outbox"]
    assert not [f for f in os.listdir(tmp_path) if ".padded" in f]  # the padded copy is gone
    # the readings carried over carry their counter: the newest of them is a replay now
    top = max(r[0] for r in box.db.execute("SELECT fcnt FROM outbox WHERE device_id = ?", (0xA1,)))
    assert box.counters()[0xA1].fcnt >= top > 400


def _drop_counters(path):
    db = sqlite3.connect(path)
    db.execute("DROP TABLE counters")
    db.commit()
    db.close()


def _scribble_counters(path):
    db = sqlite3.connect(path)
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'counters'").fetchone()[0]
    db.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * 1024)
        f.write(b"\xa5" * 1024)


@pytest.mark.parametrize("damage", [_drop_counters, _scribble_counters], ids=lambda f: f.__name__.strip("_"))
def test_counters_lost_with_their_table_are_rebuilt_from_the_outbox_rows_and_a_replay_is_refused(
        tmp_path, monkeypatch, damage):
    _no_broker(monkeypatch)  # so the broker's retained states cannot stand in for them
    path = str(tmp_path / "o.sqlite")
    box = _pending_file(path, 60)
    _close_cleanly(box)
    damage(path)
    box, report, m = _open_state(path)
    assert report.problems == ["state_file_damaged"]
    assert report.salvaged["counters"] == 0 and report.salvaged["pending"] == 61  # 60 events, the newest state
    assert report.rebuilt["counters"] == 1  # the bins table survived: its rows carry it as ever
    assert box.counters()[0xA1].fcnt == 60 and box.counters()[0xA1].key_id == _devices()[0xA1].key_id
    assert box.bins()["bin-a"].fcnt == 60
    p = Pipeline(CFG, _devices(), box, m)
    p.process([("r0", _reading(KEY_A, 0xA1, 60, dist=360))])  # a recorded copy of a pending frame
    p.process([("r0", _reading(KEY_A, 0xA1, 31, dist=331))])
    assert m.value("binlink_frames_rejected_total", reason="replay") == 2
    assert m.value("binlink_frames_accepted_total") == 0
    p.process([("r0", _reading(KEY_A, 0xA1, 61))])
    assert m.value("binlink_frames_accepted_total") == 1


def test_a_lost_wal_is_said_with_what_is_known(tmp_path, monkeypatch, caplog):
    _no_broker(monkeypatch)
    path = str(tmp_path / "o.sqlite")
    box = _pending_file(path, 300)
    box.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the first 300 in the file
    p = Pipeline(CFG, _devices(), box, Metrics())
    for fcnt in range(301, 321):  # 20 more only in the WAL
        p.process([("r0", _reading(KEY_A, 0xA1, fcnt))])
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for suffix in ("", ".open"):  # what a crash leaves, less its WAL
        with open(path + suffix, "rb") as src, open(str(crashed / "o.sqlite") + suffix, "wb") as dst:
            dst.write(src.read())
    box.db.close()
    box, report, m = _open_state(str(crashed / "o.sqlite"))
    assert report.problems == ["wal_missing"]
    assert m.value("binlink_state_problems_total", problem="wal_missing") == 1
    said = [r for r in caplog.records if r.getMessage().startswith("pending readings may be lost with the WAL")]
    assert len(said) == 1 and said[0].levelname == "ERROR"
    # 300 events and the newest state left (each reading's state row supersedes the one before);
    # the 20 readings of the WAL are gone and, without the broker, nothing here can count them
    assert said[0].fields["pending_rows_left"] == box.depth() == 301
    assert said[0].fields["highest_row_id"] == 600
    assert box.counters()[0xA1].fcnt == 300


def test_state_rows_with_values_no_writer_makes_are_passed_over_not_trusted(tmp_path):
    """The state file is input like a frame: a counter of text or beyond 32 bits, a window that is
    not bytes, a bin fill of 400 %, an outbox row whose counter is text — none stops the start or
    raises a counter; the sound rows still count."""
    box = Outbox(str(tmp_path / "o.sqlite"))
    p = Pipeline(CFG, _devices(), box, Metrics())
    p.process([("r0", _reading(KEY_A, 0xA1, n)) for n in (1, 2)] + [("r0", _reading(KEY_B, 0xB2, 1))])
    box.close()
    db = sqlite3.connect(box.path)
    db.execute("UPDATE counters SET last_fcnt = 'lots' WHERE device_id = ?", (0xB2,))
    db.execute("INSERT INTO counters(device_id, last_fcnt, key_id, key_epoch, stored, upto_id) VALUES (?, ?, 'k', 0, 7, 0)",
               (0xC3, 1 << 40))
    db.execute("INSERT INTO bins(bin_id, key_epoch, fcnt, fill_pct, flags, updated_at, upto_id) VALUES "
               "('bin-x', 0, 3, 400.0, 0, 1.0, 0)")
    db.execute("INSERT INTO outbox(message_key, topic, payload, retain, received_at, kind, device_id, key_epoch, fcnt) "
               "VALUES ('x', 't', '', 0, 1.0, 0, ?, 0, 'nine thousand')", (0xA1,))
    db.commit()
    db.close()
    reopened = Outbox(box.path)
    counters, bins = reopened.counters(), reopened.bins()
    assert set(counters) == {0xA1} and counters[0xA1].fcnt == 2
    assert set(bins) == {"bin-a", "bin-b"}
    p2 = Pipeline(CFG, _devices(), reopened, Metrics())
    assert p2.process([("r0", _reading(KEY_A, 0xA1, 3)), ("r0", _reading(KEY_B, 0xB2, 2))]) == 2
