"""The gateway's state against its disk: full, damaged, lost — and a radio unplugged over and over.

The gateway runs as its own process against a real Mosquitto and real ptys; a subscriber counts
every message id, so "nothing lost, nothing replayed" is checked where a user would see it."""
import json
import os
import sqlite3
import subprocess
import time

import pytest

from binlink.wire import framing
from binlink.gateway import storage, walcheck
from tests.harness import BINLINK, KEY, GatewayProcess, Subscriber, fill_volume, wait_for
from tests.test_gateway import DEV_A, DEV_B, DEVICES, KEY2, reading


def _acks_written(gw):
    """Every message acknowledged by the broker and that written to the outbox."""
    m = gw.metrics()
    return m.get(("binlink_outbox_depth", ()), 1) == 0 and m.get(("binlink_outbox_acks_unwritten", ()), 1) == 0


def _uplink_ids(sub):
    return [e["message_id"] for e in sub.events()]


def _db(tmp_path):
    return os.path.join(str(tmp_path), "state", "gateway.sqlite")


def _send(pty, numbers, dev=DEV_A):
    for n in numbers:
        pty.write(framing.frame(reading(n, dist=300 + n % 800, dev=dev, key=KEY2 if dev == DEV_B else KEY)))


# a full disk -------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """The state directory on a 3 MB tmpfs (mounting needs root; CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is tested on a small tmpfs, which only root can mount")
    d = tmp_path / "state"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip("cannot mount a tmpfs here: %s" % r.stderr.strip())
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def _last_state_fcnt(subscriber):
    """The counter of bin-a's newest state on the broker, None before one arrives (the events of
    a burst can all be in before its conflated state is)."""
    states = subscriber.on("bin/bin-a/state")
    return json.loads(states[-1][1])["fcnt"] if states else None


def test_full_disk_refuses_frames_stays_up_and_resumes_by_itself(tmp_path, small_disk, broker, pty, subscriber):
    gw = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=DEVICES).start()
    try:
        _send(pty, range(1, 11))
        wait_for(lambda: len(subscriber.events()) == 10, what="10 events before the disk fills")
        filler = fill_volume(small_disk)
        n = 10
        while gw.metric("binlink_storage_full") == 0:  # a commit may still fit in space the WAL already has
            n += 1
            assert n < 3000, "the disk never filled"
            _send(pty, [n])
            time.sleep(0.01)
        # 20 more refused: a small commit may still fit where a refused one had the disk allocate
        # blocks before it failed (SQLite keeps the WAL's size; a rolled-back batch leaves its room)
        while gw.metric("binlink_frames_rejected_total", reason="storage_full") < 21:
            n += 1
            assert n < 3000, "frames kept fitting on a full disk"
            _send(pty, [n])
            wait_for(lambda: gw.metric("binlink_frames_read_total") == n, what="frame %d read" % n)
        last_full = n
        refused = gw.metric("binlink_frames_rejected_total", reason="storage_full")
        accepted = gw.metric("binlink_frames_accepted_total")
        assert refused >= 21 and accepted + refused == last_full
        assert gw.alive()
        # what it holds is still published: every accepted reading, none of the refused ones
        wait_for(lambda: len(subscriber.events()) == accepted, what="accepted readings published while full")
        wait_for(lambda: any(s.get("storage_full") == 1 for s in subscriber.json("gateway/gw-test/stats")),
                 what="storage full in the stats topic")
        out = gw.output()
        assert out.count("storage full: new frames are refused") == out.count("storage has room again") + 1  # once a spell
        assert "Traceback" not in out and "cannot rollback" not in out
        os.unlink(filler)
        _send(pty, range(last_full + 1, last_full + 11))
        wait_for(lambda: gw.metric("binlink_storage_full") == 0, what="storage full cleared")
        wait_for(lambda: "0000a1:0:%d" % (last_full + 10) in _uplink_ids(subscriber), what="frames after room returned")
        wait_for(lambda: _acks_written(gw), what="acks written once there is room")
        ids = _uplink_ids(subscriber)
        assert len(ids) == len(set(ids)) == gw.metric("binlink_frames_accepted_total")
        assert "storage has room again" in gw.output()
    finally:
        gw.kill()


def test_full_disk_while_the_publisher_works_off_a_backlog(tmp_path, small_disk, pty):
    """The subscriber's session persists in the broker, so it misses nothing whichever of it and
    the gateway's publisher reconnects first after the broker's restart."""
    from binlink.sim.broker import Mosquitto

    broker = Mosquitto(persistent=True).start()
    sub = Subscriber(broker.port, persistent=True)
    gw = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=DEVICES).start()
    try:
        broker.kill()
        _send(pty, range(1, 201))
        wait_for(lambda: gw.metric("binlink_frames_accepted_total") == 200, what="200 accepted with the broker down")
        filler = fill_volume(small_disk)
        broker.start()
        # acks cannot be written, yet publishing goes on from what the outbox holds
        wait_for(lambda: len(set(_uplink_ids(sub))) == 200, timeout=60,
                 what="backlog published on a full disk (%d seen)" % len(set(_uplink_ids(sub))))
        assert gw.alive() and "Traceback" not in gw.output()
        # said, though no frame was refused: the acknowledgements wait in memory
        wait_for(lambda: gw.metric("binlink_storage_full") == 1, timeout=30, what="storage full said for acknowledgements")
        assert gw.output().count("storage full: broker acknowledgements cannot be written") == 1
        os.unlink(filler)
        wait_for(lambda: _acks_written(gw), what="acks written after room returned")
        assert gw.metric("binlink_storage_full") == 0 and "storage has room again" in gw.output()
        _send(pty, [201])
        wait_for(lambda: "0000a1:0:201" in _uplink_ids(sub), what="a new frame after room returned")
    finally:
        sub.close()
        gw.kill()
        broker.stop()


# a retired bin ----------------------------------------------------------------------------
def test_retire_then_power_cut_restarts_and_keeps_every_counter(tmp_path, broker, pty, subscriber):
    """`binlink registry retire` queues the bin's clearing messages in the outbox; a power cut
    before they are pruned must not stop the next start (it once did, in a restart loop)."""
    gw = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=DEVICES).start()
    try:
        _send(pty, range(1, 6))
        _send(pty, range(1, 4), dev=DEV_B)
        wait_for(lambda: len(subscriber.events()) == 8, what="8 readings published")
        r = subprocess.run([BINLINK, "registry", "--config", gw.config, "retire", "bin-b"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "queued" in r.stdout
        gw.kill()  # the power cut: the clearing rows are still in the outbox
        gw.start()  # returns once the serial port is open again: past recovery
        _send(pty, [5, 6])  # 5 again: a replay now, its counter kept through both
        wait_for(lambda: gw.metric("binlink_frames_read_total") == 2, what="both frames read")
        wait_for(lambda: "0000a1:0:6" in _uplink_ids(subscriber), what="the next reading published")
        assert gw.metric("binlink_frames_rejected_total", reason="replay") == 1
        # unacknowledged rows go out again after the kill under the same ids; nothing new for the replay
        assert set(_uplink_ids(subscriber)) == {"0000a1:0:%d" % n for n in range(1, 7)} | {"0000b2:0:%d" % n for n in (1, 2, 3)}
        assert "Traceback" not in gw.output()
    finally:
        gw.kill()


# damaged or lost state --------------------------------------------------------------------
def _checkpoint(db_path):
    db = sqlite3.connect(db_path)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def _truncate_half(db_path):
    _checkpoint(db_path)
    with open(db_path, "r+b") as f:
        f.truncate(os.path.getsize(db_path) // 2)


def _scribble_header(db_path):
    _checkpoint(db_path)
    with open(db_path, "r+b") as f:
        f.write(os.urandom(100))


def _scribble_middle(db_path):
    _checkpoint(db_path)
    size = os.path.getsize(db_path)
    with open(db_path, "r+b") as f:
        f.seek(size // 2 // 1024 * 1024)
        f.write(b"\xa5" * 4096)  # the same damage every run


def _delete(db_path):
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db_path + suffix):
            os.unlink(db_path + suffix)


def _delete_wal(db_path):
    os.unlink(db_path + "-wal")


def _wal_chain(db_path):
    """The WAL's bytes and the frames SQLite would replay of it (a cut must land inside those)."""
    with open(db_path + "-wal", "rb") as f:
        wal = f.read()
    kept = walcheck.read(wal).kept_frames
    assert kept >= 4, "too few WAL frames to cut: %d" % kept
    return wal, kept


def _cut_wal_end(db_path):
    wal, kept = _wal_chain(db_path)
    with open(db_path + "-wal", "wb") as f:
        f.write(wal[:32 + (kept - 2) * (24 + storage.PAGE_SIZE)])


def _cut_wal_middle(db_path):
    wal, kept = _wal_chain(db_path)
    cut = 32 + kept // 2 * (24 + storage.PAGE_SIZE) + 100
    with open(db_path + "-wal", "wb") as f:
        f.write(wal[:cut] + wal[cut + 700:])


def _empty(db_path):
    _checkpoint(db_path)
    open(db_path, "w").close()


DAMAGE = {  # how the file is hurt -> (problem reported, damaged copy kept aside)
    _truncate_half: ("state_file_damaged", True),
    _scribble_header: ("state_file_damaged", True),
    _scribble_middle: ("state_file_damaged", True),
    _delete: ("state_file_missing", False),
    _delete_wal: ("wal_missing", None),  # the file may also be mid-checkpoint, so damaged as well
    _cut_wal_end: ("wal_damaged", None),
    _cut_wal_middle: ("wal_damaged", None),
    _empty: ("state_file_empty", True),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=lambda f: f.__name__.strip("_"))
def test_damaged_or_lost_state_is_reported_and_no_recorded_frame_is_accepted_again(tmp_path, broker, pty, subscriber, damage):
    problem, kept_aside = DAMAGE[damage]
    gw = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=DEVICES).start()
    try:
        recorded = {n: framing.frame(reading(n, dist=300 + n)) for n in range(1, 401)}
        for n in recorded:
            pty.write(recorded[n])
        wait_for(lambda: len(subscriber.events()) == 400, timeout=30, what="400 events")
        wait_for(lambda: _last_state_fcnt(subscriber) == 400, what="retained state 400")
        if damage is not _cut_wal_end:  # its cut must take readings: a lost acknowledgement costs a republish only
            wait_for(lambda: _acks_written(gw), what="acks written")
        gw.kill()
        damage(_db(tmp_path))
        gw.start()
        out = gw.output()
        assert "STATE PROBLEM" in out and "problem=%s" % problem in out
        assert gw.metric("binlink_state_problems_total", problem=problem) == 1
        copies = [f for f in os.listdir(os.path.dirname(_db(tmp_path))) if ".damaged-" in f]
        assert kept_aside is None or bool(copies) == kept_aside
        for n in (400, 399, 250):  # recorded copies of frames already accepted
            pty.write(recorded[n])
        pty.write(framing.frame(reading(401, dist=700)))
        wait_for(lambda: "0000a1:0:401" in _uplink_ids(subscriber), what="the next new frame")
        wait_for(lambda: gw.metric("binlink_frames_read_total") == 4, what="every frame read")
        assert gw.metric("binlink_frames_rejected_total", reason="replay") == 3
        assert gw.metric("binlink_frames_accepted_total") == 1, "a recorded frame was accepted again"
        # QoS 1: a message whose ack was still in memory at the kill may come again, same id
        assert set(_uplink_ids(subscriber)) == {"0000a1:0:%d" % n for n in range(1, 402)}
        gw.kill()
        gw.start()  # and the repaired state is a good one: no new problem, no crash loop
        assert gw.metric("binlink_state_problems_total") == 0 and gw.alive()
    finally:
        if gw.alive():
            gw.kill()


def test_salvage_carries_pending_readings_over_from_a_damaged_file(tmp_path, broker, pty, subscriber):
    """Pending readings in the readable part of a damaged file are published; the rest are counted."""
    gw = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=DEVICES).start()
    try:
        broker.kill()
        _send(pty, range(1, 601))
        wait_for(lambda: gw.metric("binlink_frames_accepted_total") == 600, what="600 accepted with the broker down")
        gw.kill()
        _scribble_middle(_db(tmp_path))
        broker.start()
        wait_for(lambda: subscriber.c.is_connected(), what="subscriber back")
        time.sleep(0.5)
        gw.start()
        out = gw.output()
        assert "problem=state_file_damaged" in out
        salvaged = int(gw.metric("binlink_state_salvaged_rows_total", table="outbox"))
        assert 0 < salvaged < 600 * 2  # events and states, a few pages of them unreadable
        line = [ln for ln in out.splitlines() if "carried over from the damaged state file" in ln][-1]
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv and not kv.startswith("msg"))
        pending = int(fields["pending"])
        assert pending > 0
        wait_for(lambda: gw.metric("binlink_outbox_depth") == 0, timeout=30, what="salvaged backlog published")
        # acknowledged by the broker; the subscriber takes them in on its own time: every reading
        # is published or counted as unreadable
        unreadable = int(fields["unreadable_outbox_rows"])
        wait_for(lambda: len(set(_uplink_ids(subscriber))) + unreadable >= 600, timeout=15,
                 what="every reading published or counted unreadable")
        assert len(set(_uplink_ids(subscriber))) >= 500, "most readings of a file with 4 KB scribbled over should survive"
    finally:
        gw.kill()


def test_a_retained_state_from_the_future_is_refused_not_believed(tmp_path, broker, pty, subscriber):
    """A state dated three years ahead (a broker's hostile writer, or a gateway whose clock ran
    ahead) is no evidence of the time nor of a counter: refused and counted, the clock not called
    wrong, the bin's next frames accepted (issue 18; before, every message said time_synced false)."""
    future = time.time() + 3 * 365 * 86400
    state = {"device": "0000a1", "bin_id": "bin-a", "key_epoch": 0, "fcnt": 50, "fill_pct": 40.0, "flags": [],
             "time_synced": True, "received_at": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(future))}
    pub = Subscriber(broker.port, topics=("nothing/#",))
    try:
        pub.c.publish("binlink/testcity/bin/bin-a/state", json.dumps(state), qos=1, retain=True).wait_for_publish(5)
    finally:
        pub.close()
    gw = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=DEVICES).start()
    try:
        wait_for(lambda: gw.metric("binlink_readback_rejected_total", source="retained", reason="future") == 1,
                 what="the future state refused")
        assert gw.metric("binlink_clock_suspect") == 0 and "system clock cannot be right" not in gw.output()
        pty.write(framing.frame(reading(50)))
        wait_for(lambda: subscriber.events(), what="event 50")
        [event] = subscriber.events()
        assert event["message_id"] == "0000a1:0:50" and gw.metric("binlink_frames_rejected_total", reason="replay") == 0
    finally:
        gw.kill()


# a radio unplugged and plugged back -------------------------------------------------------
def test_radio_replugged_20_times_is_reopened_each_time_and_loses_no_frame_sent_after(tmp_path, broker, pty, subscriber):
    gw = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=DEVICES).start()
    try:
        pty.write(framing.frame(reading(1)))
        for cycle in range(1, 21):
            wait_for(lambda: "0000a1:0:%d" % cycle in _uplink_ids(subscriber), what="event %d" % cycle)
            pty.unplug()
            time.sleep(0.2)
            pty.plug()
            wait_for(lambda: gw.metric("binlink_serial_reopens_total") == cycle, what="reopen %d" % cycle)
            pty.write(framing.frame(reading(cycle + 1)))
        wait_for(lambda: "0000a1:0:21" in _uplink_ids(subscriber), what="last event")
        ids = _uplink_ids(subscriber)
        assert ids == ["0000a1:0:%d" % n for n in range(1, 22)]
        assert gw.alive() and gw.output().count("serial port lost") == 20
    finally:
        gw.kill()


def test_gateway_started_on_a_full_disk_waits_for_room_then_runs(tmp_path, small_disk, broker, pty, subscriber):
    gw = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=DEVICES).start()
    try:
        _send(pty, [1])
        wait_for(lambda: len(subscriber.events()) == 1, what="first event")
        assert gw.terminate() == 0  # a clean stop: SQLite removes the WAL and -shm, which a start must create again
        filler = fill_volume(small_disk)
        gw.start(wait_sources=False)
        wait_for(lambda: "storage full" in gw.output(), what="storage full said at start")
        time.sleep(1)
        assert gw.alive() and "Traceback" not in gw.output()
        os.unlink(filler)
        wait_for(lambda: gw.metric("binlink_serial_connected") >= 1, timeout=30, what="running once there is room")
        _send(pty, [2])
        wait_for(lambda: "0000a1:0:2" in _uplink_ids(subscriber), what="a frame after room returned")
    finally:
        if gw.alive():
            gw.kill()


def test_a_bin_past_65535_is_heard_again_after_its_state_file_is_lost(tmp_path, broker, pty, subscriber):
    """Frames carry 16 counter bits; without the counter the rest cannot be guessed (bad_tag forever)."""
    gw = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=DEVICES).start()
    try:
        steps = [1, 16001, 32001, 48001, 64001, 70001]  # each jump within the allowed counter gap
        for n in steps:
            pty.write(framing.frame(reading(n)))
        wait_for(lambda: len(subscriber.events()) == len(steps), what="climb past 65535")
        wait_for(lambda: _last_state_fcnt(subscriber) == 70001, what="retained state")
        gw.kill()
        _delete(_db(tmp_path))
        gw.start()
        pty.write(framing.frame(reading(70001)))  # a recording of the last frame
        pty.write(framing.frame(reading(70002)))
        wait_for(lambda: "0000a1:0:70002" in _uplink_ids(subscriber), what="the bin heard again")
        assert gw.metric("binlink_frames_rejected_total", reason="replay") == 1
        assert gw.metric("binlink_frames_rejected_total", reason="bad_tag") == 0
    finally:
        gw.kill()


def test_a_damaged_row_is_skipped_and_counted_and_the_rest_is_published(tmp_path, broker, pty, subscriber):
    """A row whose payload cannot be read (a flipped bit, a salvaged page) must not stop the
    publisher: it is skipped, counted and logged, and every other reading reaches the broker."""
    gw = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=DEVICES).start()
    try:
        broker.kill()
        _send(pty, range(1, 11))  # a first commit saves the new bin's counter and level to their tables ...
        wait_for(lambda: gw.metric("binlink_frames_accepted_total") == 10, what="10 accepted with the broker down")
        _send(pty, range(11, 21))  # ... later ones leave them to their rows (docs/gateway.md, SD-card write volume)
        wait_for(lambda: gw.metric("binlink_frames_accepted_total") == 20, what="20 accepted with the broker down")
        gw.kill()  # not stopped cleanly: the bin's counter and level are read back from its rows at start
        db = sqlite3.connect(_db(tmp_path))
        damaged = {}
        for payload, fcnt in ((b"\x02\x09 no such kind", 3), (b"\x02\x01 cut short", 7), (b"\x01\xff\xfe not deflate", 11)):
            (row_id, key), = db.execute("SELECT id, message_key FROM outbox WHERE retain = 0 AND message_key LIKE ?",
                                        ("%%:%d" % fcnt,)).fetchall()
            db.execute("UPDATE outbox SET payload = ? WHERE id = ?", (payload, row_id))
            damaged[key] = row_id
        # and the bin's newest state, which the gateway reads back at start for the bin's counter and level
        db.execute("UPDATE outbox SET payload = ? WHERE id = (SELECT max(id) FROM outbox WHERE retain = 1)", (b"\x02\x00",))
        db.commit()
        db.close()
        broker.start()
        wait_for(lambda: subscriber.c.is_connected(), what="subscriber back")
        gw.start()
        wait_for(lambda: gw.metric("binlink_outbox_depth") == 0, timeout=30, what="backlog published")
        assert gw.metric("binlink_outbox_unreadable_rows_total") == 4
        _send(pty, [21])  # the counter survived the damaged state: the next frame is new, not a replay
        want = {"0000a1:0:%d" % n for n in range(1, 22)} - set(damaged)
        wait_for(lambda: set(_uplink_ids(subscriber)) == want, timeout=15, what="every readable reading published")
        assert "outbox row unreadable (damaged on disk), skipped" in gw.output()
    finally:
        gw.kill()
