"""State recovery at start, before any frame is accepted.

1. The state file is checked: missing (though a marker says this gateway had state), empty,
   unreadable, or failing SQLite's quick_check; its WAL gone while its -shm is still there (SQLite
   removes both on a clean close, a crash leaves both). Each problem
   is logged loudly and counted (binlink_state_problems_total{problem=...}); nothing here raises on
   a damaged file, so a bad disk never becomes a crash loop.
2. A damaged file is moved aside (gateway.sqlite.damaged-<time>, with its -wal) for inspection,
   and whatever SQLite can still read from it — counters, bin states, outbox rows pending or not —
   is carried over into a fresh file. A damaged b-tree is read around: ranges of rows that fail are
   halved until only the unreadable rows are left out.
3. The broker's retained bin states are read (a short-lived MQTT session) and each is validated
   as strictly as a frame (parse_state): a refused one is counted and logged, never used. Only
   when step 1 found the state lost, or there was none (a first start), is a bin's counter raised
   to the `fcnt` of its valid state of the device's current key epoch, so a recorded frame is not
   accepted again; with its own state intact the gateway trusts nothing the broker says about
   counters. Valid synced states give the clock check its evidence of the time at every start.

What cannot come back: readings accepted but not yet published when their rows were lost, and
counter values newer than the broker's retained state (a frame accepted while the broker was
unreachable). Both are logged with what is known of them."""
import json
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from datetime import datetime
from typing import NamedTuple

import paho.mqtt.client as mqtt

from binlink.wire import codec
from binlink.gateway import clock, config, logs
from binlink.gateway.heads import BinState, Counter
from binlink.gateway.outbox import Outbox
from binlink.gateway.registry import Device
from binlink.gateway.storage import StorageFull, is_full

log = logs.get("recovery")
KEEP_DAMAGED = 2  # damaged copies kept aside; older ones go, so a bad disk cannot fill up with them
BROKER_WAIT_S = 3.0  # asking the broker for retained states, state intact
BROKER_WAIT_AFTER_LOSS_S = 30.0  # the same after a state loss: counters matter more than a quick start
FULL_RETRY_S = 5.0
NO_LATER_ROWS = 1 << 62  # upto_id for heads read from a file without the column: their table says it all


class Report:
    """What start-up found and did; problems are short codes, also the metric's label."""

    def __init__(self):
        self.problems = []
        self.salvaged = {}  # table -> rows carried over
        self.unreadable_rows = 0  # outbox rows (by id gap) that could not be read back
        self.newest_synced_time = None  # newest received_at of a synced retained state (clock check)
        self.first_start = False  # no state file and no marker: a new gateway, or a new SD card

    @property
    def lost(self):
        return bool(self.problems)

    @property
    def needs_counters(self):
        """Counters come from the broker only when this gateway's own are lost or were never here."""
        return self.lost or self.first_start


def marker_path(db_path):
    return db_path + ".marker"


def _read_marker(db_path):
    try:
        with open(marker_path(db_path)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_marker(db_path):
    """Says this gateway has had state here; small, atomic, fsynced. A full disk is no reason to stop."""
    if _read_marker(db_path) is not None:
        return
    tmp = marker_path(db_path) + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump({"created": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker_path(db_path))
    except OSError as e:
        logs.event(log, logging.WARNING, "state marker not written", path=marker_path(db_path), error=e)


def check(db_path):
    """None when the file opens and passes quick_check (or cannot be checked for want of room:
    a full disk is no damage), else what is wrong with it."""
    try:
        db = sqlite3.connect(db_path, timeout=30)
    except sqlite3.Error as e:
        return str(e)
    try:
        try:
            rows = db.execute("PRAGMA quick_check").fetchall()
        except sqlite3.OperationalError as e:
            if is_full(e, db_path):
                return None
            raise
        if rows != [("ok",)]:
            return "; ".join(r[0] for r in rows[:3])
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = {"outbox", "counters", "bins"} - tables
        if missing:
            return "tables missing: %s" % ", ".join(sorted(missing))
        return None
    except sqlite3.Error as e:
        return str(e)
    finally:
        db.close()


def find_problems(db_path, report):
    """Step 1: finds problems; moves a damaged file aside. Returns the damaged copy's path or None."""
    marker = _read_marker(db_path)
    if not os.path.exists(db_path):
        if marker is not None:
            _problem(report, "state_file_missing", "the state file is gone: pending readings are lost and "
                     "counters come from the broker's retained states", path=db_path)
        else:
            report.first_start = True
        if os.path.exists(db_path + "-wal"):  # a WAL without its file must not be replayed into a new one
            _move_aside(db_path)
        return None
    if os.path.getsize(db_path) == 0:
        _problem(report, "state_file_empty", "the state file is empty", path=db_path)
        return _move_aside(db_path)
    # SQLite removes both on a clean close; a crash leaves both: an -shm alone means the WAL was lost
    if os.path.exists(db_path + "-shm") and not os.path.exists(db_path + "-wal"):
        _problem(report, "wal_missing", "the state file's WAL is gone after an unclean stop: the newest "
                 "readings and counters in it are lost", path=db_path + "-wal")
    problem = check(db_path)
    if problem is not None:
        _problem(report, "state_file_damaged", "the state file is damaged", path=db_path, detail=problem[:300])
        return _move_aside(db_path)
    return None


def _problem(report, code, message, **fields):
    report.problems.append(code)
    logs.event(log, logging.ERROR, "STATE PROBLEM: " + message, problem=code, **fields)


def _move_aside(db_path):
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    aside = "%s.damaged-%s" % (db_path, stamp)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db_path + suffix):
            os.replace(db_path + suffix, aside + suffix)
    logs.event(log, logging.ERROR, "damaged state file kept aside for inspection", copy=aside)
    _forget_old_copies(db_path)
    return aside


def _forget_old_copies(db_path):
    folder, name = os.path.split(os.path.abspath(db_path))
    copies = sorted(f for f in os.listdir(folder) if f.startswith(name + ".damaged-") and not f.endswith(("-wal", "-shm")))
    for old in copies[:-KEEP_DAMAGED]:
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(os.path.join(folder, old + suffix))
            except FileNotFoundError:
                pass


# step 2: salvage ------------------------------------------------------------------------------
_TABLES = {  # table -> columns read, as Outbox.carry_over writes them
    "counters": ("device_id", "last_fcnt", "key_id", "key_epoch", "stored", "upto_id"),
    "outbox": ("id", "message_key", "topic", "payload", "retain", "received_at", "acked_at", "superseded", "kind",
               "device_id", "key_epoch", "fcnt", "bin_id"),
    "bins": ("bin_id", "key_epoch", "fcnt", "fill_pct", "flags", "updated_at", "upto_id"),
}
_MISSING = {"upto_id": str(NO_LATER_ROWS)}  # a column a file from before lacks -> what stands for it (else NULL)


def salvage(damaged_path):
    """Whatever rows of the damaged file SQLite can read: table -> rows."""
    out = {}
    try:
        db = sqlite3.connect(damaged_path, timeout=5)
    except sqlite3.Error:
        return out
    try:
        for table, wanted in _TABLES.items():
            try:
                have = {r[1] for r in db.execute("PRAGMA table_info(%s)" % table)}
            except sqlite3.Error:
                have = set(wanted)
            cols = ", ".join(c if c in have else _MISSING.get(c, "NULL") for c in wanted)
            out[table] = _readable_rows(db, table, cols)
    finally:
        db.close()
    return out


def _readable_rows(db, table, cols):
    select = "SELECT %s FROM %s NOT INDEXED" % (cols, table)
    try:
        return db.execute(select).fetchall()
    except sqlite3.Error:
        pass
    if table == "bins":  # no rowid to split by; the broker's retained states stand in for it
        return []
    try:
        top = db.execute("SELECT max(rowid) FROM %s" % table).fetchone()[0] or 0
    except sqlite3.Error:
        top = 1 << 22  # the rightmost path is damaged too: search a generous range
    rows = []
    _rows_in_range(db, select + " WHERE rowid BETWEEN ? AND ?", 0, top, rows, budget=[20000])
    return rows


def _rows_in_range(db, select, lo, hi, rows, budget):
    """Reads rowids lo..hi, halving ranges that fail; a budget of queries bounds the search."""
    if lo > hi or budget[0] <= 0:
        return
    budget[0] -= 1
    try:
        rows.extend(db.execute(select, (lo, hi)).fetchall())
        return
    except sqlite3.Error:
        if lo == hi:
            return
    mid = (lo + hi) // 2
    _rows_in_range(db, select, lo, mid, rows, budget)
    _rows_in_range(db, select, mid + 1, hi, rows, budget)


def carry_over(box, rows, report):
    """Writes salvaged rows into the fresh outbox: messages keep their ids, so the counters' and
    bin states' upto_id still say which rows may carry them further."""
    messages = rows.get("outbox", [])
    box.carry_over(rows.get("counters", []), rows.get("bins", []), messages)
    ids = sorted(r[0] for r in messages)
    report.unreadable_rows = (ids[-1] - ids[0] + 1 - len(ids)) if ids else 0
    report.salvaged = {"counters": len(rows.get("counters", [])), "bins": len(rows.get("bins", [])),
                       "outbox": len(messages), "pending": sum(1 for r in messages if r[6] is None)}


# step 3: the broker's retained states -----------------------------------------------------------
MAX_STATE_BYTES = 4096  # a rendered state is about 600 bytes; anything far larger is not one of ours
FUTURE_TOLERANCE_S = clock.TOLERANCE_S  # gateways' clocks differ a little; a state from later is no evidence
LOGGED_REJECTIONS = 10  # refused states logged one by one at each start; the rest in one summary line
_DEVICE_HEX = re.compile(r"[0-9a-f]{6}")
_FLAG_NAMES = frozenset(name for _, name in codec.FLAG_NAMES)


class RetainedState(NamedTuple):
    """A retained bin state that passed parse_state: every field of the type and range it must have."""
    bin_id: str
    device: Device  # the device the registry has for this bin now
    fcnt: int
    key_epoch: int | None  # None: published before states carried their key's epoch
    fill_pct: float | None
    flags: int
    received_at: float
    time_synced: bool


def _is_u32(v):
    return type(v) is int and 0 <= v <= 0xFFFFFFFF  # type(): bool and float are refused, not coerced


def parse_state(bin_id, payload, devices_by_dev, now):
    """(RetainedState, None) or (None, reason): a retained state is judged as strictly as a frame,
    since anyone who may publish under the base topic can leave one there."""
    if len(payload) > MAX_STATE_BYTES:
        return None, "too_large"
    try:
        s = json.loads(payload)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested beyond the parser
        return None, "not_json"
    if not isinstance(s, dict):
        return None, "not_object"
    dev = s.get("device")
    if not isinstance(dev, str) or not _DEVICE_HEX.fullmatch(dev):
        return None, "device"
    device = devices_by_dev.get(dev)
    if device is None:
        return None, "unknown_device"
    if device.bin_id != bin_id:
        return None, "other_bin"
    if not _is_u32(s.get("fcnt")):
        return None, "fcnt"
    epoch = s.get("key_epoch")
    if "key_epoch" in s and not _is_u32(epoch):
        return None, "key_epoch"
    fill = s.get("fill_pct")
    if fill is not None and not (type(fill) in (int, float) and 0 <= fill <= 100):  # NaN compares false
        return None, "fill_pct"
    flags = s.get("flags")
    if not isinstance(flags, list) or not all(isinstance(f, str) and f in _FLAG_NAMES for f in flags):
        return None, "flags"
    at = _parse_time(s.get("received_at"))
    if at is None or at < clock.RELEASED:
        return None, "received_at"
    if at > now + FUTURE_TOLERANCE_S:
        return None, "future"
    synced = s.get("time_synced")
    if type(synced) is not bool:
        return None, "time_synced"
    return RetainedState(bin_id, device, s["fcnt"], epoch, fill, codec.flag_bits(flags), at, synced), None


def _parse_time(text):
    """Seconds since the epoch of an ISO time with its zone (as the gateway writes it), else None."""
    if not isinstance(text, str) or len(text) > 40:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t.timestamp() if t.tzinfo is not None else None  # a time without a zone is no time


def retained_states(cfg, timeout_s):
    """The retained messages under the base topic's bin states: [(bin_id, payload)], or None when
    the broker cannot be reached in time. Complete: a probe published after subscribing comes back
    after every retained message (one connection's messages arrive in order). An oversized payload
    is cut just past the size a state may have, so a broker full of them cannot fill the memory."""
    probe = "%s/gateway/%s/recovery-probe/%s" % (cfg.base_topic, cfg.gateway_id, uuid.uuid4().hex)
    states_filter = "%s/bin/+/state" % cfg.base_topic
    states, done = [], threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="%s-recovery" % cfg.client_id, clean_session=True)
    config.apply_mqtt_settings(client, cfg.mqtt)

    def on_connect(c, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            c.subscribe([(states_filter, 1), (probe, 1)])

    def on_message(c, userdata, msg):
        if msg.topic == probe:
            done.set()
        elif msg.retain:
            states.append((msg.topic.rsplit("/", 2)[-2], msg.payload[:MAX_STATE_BYTES + 1]))  # enough to refuse

    client.on_connect = on_connect
    client.on_subscribe = lambda c, *a: c.publish(probe, b"", qos=1)
    client.on_message = on_message
    try:
        client.connect_async(cfg.mqtt.host, cfg.mqtt.port, keepalive=30)
        client.loop_start()
        reached = done.wait(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()
    return states if reached else None


def valid_states(cfg, states, devices, metrics, now):
    """The states that pass parse_state; each refused one is counted and logged (the first
    LOGGED_REJECTIONS by topic, then one line with how many more)."""
    by_dev = {d.dev: d for d in devices.values()}
    valid, refused = [], 0
    for bin_id, payload in states:
        state, reason = parse_state(bin_id, payload, by_dev, now)
        if state is not None:
            valid.append(state)
            continue
        refused += 1
        metrics.readback_rejected.labels("retained", reason).inc()
        if refused <= LOGGED_REJECTIONS:
            logs.event(log, logging.WARNING, "retained bin state refused: not used for counters or the clock",
                       topic=state_topic(cfg, bin_id), reason=reason)
    if refused > LOGGED_REJECTIONS:
        logs.event(log, logging.WARNING, "more retained bin states refused", more=refused - LOGGED_REJECTIONS)
    return valid


def state_topic(cfg, bin_id):
    return "%s/bin/%s/state" % (cfg.base_topic, bin_id)


def newest_synced_time(states):
    """Clock evidence: the newest received_at of a synced state (validated, so never from the future)."""
    return max((s.received_at for s in states if s.time_synced), default=None)


def counters_from_states(states, local_bins):
    """(counters, bins) the validated states support: a state counts only under the key its device
    has now. A state without key_epoch (published by 0.4.0 or before) can be of any key the bin had, so it
    counts only for a device never re-keyed (epoch 0); a new key's counter starts again at 0, and
    an old key's counter taken for it would refuse the new key's frames as replays."""
    counters, bins = {}, {}
    for s in states:
        device = s.device
        epoch = device.key_epoch if s.key_epoch is None and device.key_epoch == 0 else s.key_epoch
        if epoch != device.key_epoch:
            continue
        local = local_bins.get(s.bin_id)
        if local is not None and local.updated_at > s.received_at and local.fcnt < s.fcnt:
            continue  # a newer state here with a lower counter: the bin was re-provisioned since
        counter = counters.get(device.device_id)
        if counter is not None and counter.fcnt >= s.fcnt:
            continue
        counters[device.device_id] = Counter(s.fcnt, device.key_id, device.key_epoch)
        if local is None or local.is_newer(device.key_epoch, s.fcnt):
            bins[s.bin_id] = BinState(device.key_epoch, s.fcnt, s.fill_pct, s.flags, s.received_at)
    return counters, bins


def use_retained_states(cfg, box, devices, report, metrics):
    """Reads the broker's retained states: clock evidence at every start; counters only when this
    gateway's own are lost or were never here (report.needs_counters)."""
    wait = BROKER_WAIT_AFTER_LOSS_S if report.lost else BROKER_WAIT_S  # a first start does not wait long for a broker
    states = retained_states(cfg, wait)
    if states is None:
        level = logging.ERROR if report.lost else logging.INFO
        logs.event(log, level, "broker not reached: counters not checked against its retained states"
                   + ("; a recorded frame of a bin whose counter was lost could be accepted" if report.lost else ""),
                   waited_s=wait)
        return
    valid = valid_states(cfg, states, devices, metrics, time.time())
    report.newest_synced_time = newest_synced_time(valid)
    if not report.needs_counters:
        return  # our own counters are whole: a retained state could only be older, or not ours
    counters, bins = counters_from_states(valid, box.bins())
    local = box.counters()
    raised = {d: c for d, c in counters.items() if d not in local or local[d].key_id != c.key_id or local[d].fcnt < c.fcnt}
    if raised:
        box.raise_counters(raised, bins)
        metrics.counters_from_broker.inc(len(raised))
        logs.event(log, logging.ERROR if report.lost else logging.WARNING,
                   "frame counters raised from the broker's retained states", devices=len(raised),
                   retained_states=len(states), valid_states=len(valid))


# the whole start-up ---------------------------------------------------------------------------
def open_state(cfg, db_path, devices, metrics, stop_event, keepalive=lambda: None):
    """Checks, repairs and opens the outbox; returns (Outbox, Report). Waits (keepalive() between
    tries) while the disk is too full to open it."""
    report = Report()
    damaged = find_problems(db_path, report)
    for code in report.problems:
        metrics.state_problems.labels(code).inc()
    box = _open(db_path, stop_event, keepalive)
    if damaged is not None:
        try:
            carry_over(box, salvage(damaged), report)
        except StorageFull:
            logs.event(log, logging.ERROR, "storage full: nothing carried over from the damaged state file", copy=damaged)
        for table, n in report.salvaged.items():
            metrics.state_salvaged.labels(table).inc(n)
        logs.event(log, logging.ERROR, "carried over from the damaged state file", unreadable_outbox_rows=report.unreadable_rows,
                   **report.salvaged)
    _write_marker(db_path)
    try:
        use_retained_states(cfg, box, devices, report, metrics)
    except StorageFull:
        logs.event(log, logging.ERROR, "storage full: counters from the broker not stored")
    return box, report


def _open(db_path, stop_event, keepalive):
    said = False
    while True:
        try:
            return Outbox(db_path)
        except StorageFull as e:
            if not said:
                logs.event(log, logging.ERROR, "storage full: cannot open the state file, waiting for room", path=db_path,
                           error=str(e))
                said = True
            keepalive()
            if stop_event.wait(FULL_RETRY_S):
                raise
