"""Durable outbox: SQLite (WAL) holding every accepted reading's MQTT messages until the broker's
QoS 1 acknowledgement, with the per-device counters and per-bin state committed in the same
transaction — so a counter never advances for a reading that is not on disk, and vice versa.

Sized for a Raspberry Pi's SD card (docs/gateway.md, "SD-card write volume"): small pages (a
commit rewrites whole pages), payloads deflated, no indexes on pending rows, counters and bin
states carried by the reading's own rows between saves (_load_heads), a WAL checkpointed every
~1 MB and cut back afterwards. A full disk is a state (StorageFull), not a crash: a failed commit
leaves nothing behind and the next one succeeds once there is room again.

One Outbox object per thread (SQLite connections are not shared across threads)."""
import json
import logging
import os
import sqlite3
import struct
import time
import zlib

from binlink.wire import codec
from binlink.gateway import integrate, logs

log = logs.get("storage")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,             -- never reused: prune() keeps the newest row
    message_key TEXT NOT NULL,          -- <device>:<fcnt>[:<kind>]: a reading is stored once
    topic TEXT NOT NULL,
    payload TEXT NOT NULL,
    retain INTEGER NOT NULL,
    received_at REAL NOT NULL,
    acked_at REAL,                      -- broker's PUBACK (or superseded, for a retained state)
    superseded INTEGER NOT NULL DEFAULT 0
);
-- no index on pending rows: each would be one more page written per reading and per ack
DROP INDEX IF EXISTS outbox_pending;
DROP INDEX IF EXISTS outbox_pending_retained;
-- Counters and bin states as of outbox row upto_id: the rows after it (the readings themselves,
-- committed with them) may carry them further (see _load_heads).
CREATE TABLE IF NOT EXISTS counters (
    device_id INTEGER PRIMARY KEY, last_fcnt INTEGER NOT NULL,
    key_id TEXT NOT NULL,               -- fingerprint of the key the counter was accepted under
    upto_id INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS bins (
    bin_id TEXT PRIMARY KEY, fcnt INTEGER NOT NULL, fill_pct REAL, flags INTEGER NOT NULL, updated_at REAL NOT NULL,
    upto_id INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS receptions (
    device_id INTEGER NOT NULL, fcnt INTEGER NOT NULL, source TEXT NOT NULL, rssi INTEGER, snr REAL,
    received_at REAL NOT NULL, duplicate INTEGER NOT NULL
);
"""
KEEP_ACKED_S = 7 * 24 * 3600  # acked keys kept this long so a late copy is not published again
PAGE_SIZE = 1024  # a commit writes whole pages to the WAL: small pages, fewer bytes per reading
CHECKPOINT_PAGES = 1000  # ~1 MB of WAL between checkpoints: few rewrites of hot pages, bounded size
WAL_LIMIT_BYTES = 1100 * 1024  # the WAL file is cut back to this after a checkpoint
SAVE_HEADS_S = 600.0  # counters and bin states proven by their rows are written to their tables this often


# A reading's messages are stored as binary records (0x02, integrate.py) the publisher renders to
# JSON. Other payloads (hellos, notices, ...) are stored deflated against a preset dictionary of
# what the messages share (keys, timestamp shape): ~400 bytes of JSON become ~80, and so were the
# readings' before 0.3 (those rows stay readable). Rows say how they are stored by their first
# byte (JSON never starts with a control byte). NEVER edit a dictionary: rows written with it
# could not be read back. A new one needs a new prefix byte, and the old ones stay readable.
_PACKED_V1 = b"\x00"  # 1 KB window, events only in the dictionary (the first 0.2 rows)
_ZDICT_V1 = (b'{"backlog":false,"battery_v":3.7,"bin_id":"","device":"","distance_mm":,"event":"uplink","fcnt":,'
             b'"fill_pct":,"flags":["low_battery"],"gateway":"","measured_at":"2026-11-27T00:00:00.000Z","message_id":"",'
             b'"pings":5,"problem":false,"received_at":"2026-11-27T00:00:00.000Z","rssi":-,"snr":,"source":"",'
             b'"temperature_c":,"time_synced":true,"valid_pings":5}')
_PACKED_V2 = b"\x01"  # 2 KB window; a bin state's shape (forecast, position) after the event's
_ZDICT_V2 = _ZDICT_V1 + (
    b'{"battery_v":3.7,"bin_id":"","device":"","distance_mm":,"fcnt":,"fill_pct":,"fill_rate_pct_per_day":,'
    b'"flags":[],"full_at":"2026-11-27T00:00:00.000Z","gateway":"","lat":,"lon":,"measured_at":"2026-11-27T00:00:00.000Z",'
    b'"name":"","pings":5,"problem":false,"received_at":"2026-11-27T00:00:00.000Z","rssi":-,"snr":,"source":"",'
    b'"temperature_c":,"time_synced":true,"valid_pings":5}')
_DICTS = {_PACKED_V1: (-10, _ZDICT_V1), _PACKED_V2: (-11, _ZDICT_V2)}
_PACKER = zlib.compressobj(6, zlib.DEFLATED, -11, 2, zdict=_ZDICT_V2)  # copied per payload: the dictionary is read once


def pack(payload):
    """Stored form of a payload: a reading's record as it is (integrate.py), JSON deflated."""
    if isinstance(payload, str):
        payload = payload.encode()
    elif payload[:1] == integrate.RECORD:
        return payload
    c = _PACKER.copy()
    return _PACKED_V2 + c.compress(payload) + c.flush()


def unpack(stored):
    """The payload as published: JSON."""
    if isinstance(stored, bytes) and stored[:1] == integrate.RECORD:
        return integrate.render(stored)
    if isinstance(stored, bytes) and stored[:1] in _DICTS:
        wbits, zdict = _DICTS[stored[:1]]
        d = zlib.decompressobj(wbits, zdict=zdict)
        return d.decompress(stored[1:]) + d.flush()
    return stored  # written before payloads were packed


def readable(stored):
    """unpack(stored), or None when the row is damaged (a salvaged page, a flipped bit): one bad
    row must not stop the publisher from reading the rows after it."""
    try:
        return unpack(stored)
    except (ValueError, IndexError, TypeError, struct.error, zlib.error):
        return None


class StorageFull(Exception):
    """The disk holding the outbox is full: nothing of the failed write was kept."""


def is_full(error, path):
    """True when a SQLite error means the disk is full. SQLITE_FULL is the usual answer; a write
    or fsync that fails on a volume with no room left can also surface as an I/O error."""
    code = getattr(error, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL:
        return True
    if code is not None and code & 0xFF == sqlite3.SQLITE_IOERR:
        return free_bytes(path) < 64 * 1024
    return False


def free_bytes(path):
    st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    return st.f_bavail * st.f_frsize


class StorageGuard:
    """The full-disk state as the outside sees it: one clear log line when the disk fills and one
    when there is room again, the binlink_storage_full gauge, the frames refused meanwhile."""

    def __init__(self, metrics, path):
        self.metrics = metrics
        self.path = path
        self.full = False
        self.refused = 0  # frames refused in the current full spell

    def refuse(self, error, frames):
        self.metrics.rejected.labels("storage_full").inc(frames)
        self.refused += frames
        if not self.full:
            self.full = True
            self.metrics.storage_full.set(1)
            logs.event(log, logging.ERROR, "storage full: new frames are refused until there is room again; "
                       "what the outbox holds is still published", path=self.path, free_bytes=free_bytes(self.path),
                       error=str(error.__cause__ or error))

    def ok(self):
        if self.full:
            self.full = False
            self.metrics.storage_full.set(0)
            logs.event(log, logging.WARNING, "storage has room again: accepting frames", path=self.path,
                       free_bytes=free_bytes(self.path), refused=self.refused)
            self.refused = 0


class Batch:
    """What one group commit writes."""

    def __init__(self):
        self.messages = []  # (message_key, topic, payload, retain, received_at)
        self.states = {}  # bin_id -> retained state message: only a bin's newest state is kept
        self.counters = {}  # device_id -> (last_fcnt, key_id)
        self.bins = {}  # bin_id -> (fcnt, fill_pct, flags, updated_at)
        self.receptions = []  # extra receptions of accepted frames: (device_id, fcnt, source, rssi, snr, at, 1)
        self.accepted = 0  # frames accepted into this batch

    def __bool__(self):
        return bool(self.messages or self.counters or self.receptions)


def connect(path, durable=True, timeout=30):
    """A connection with the outbox's settings; the page size applies to a new file only."""
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=True)
    try:
        db.execute("PRAGMA page_size=%d" % PAGE_SIZE)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=%s" % ("FULL" if durable else "NORMAL"))  # FULL: survives a power cut
        db.execute("PRAGMA wal_autocheckpoint=%d" % CHECKPOINT_PAGES)
        db.execute("PRAGMA journal_size_limit=%d" % WAL_LIMIT_BYTES)
    except BaseException:
        db.close()
        raise
    return db


class Outbox:
    def __init__(self, path, durable=True):
        """durable=False (the publisher's connection): an ack lost in a power cut only means the
        message is published again under the same id, so acks skip the fsync."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        try:
            self.db = connect(path, durable)
        except sqlite3.OperationalError as e:
            if is_full(e, path):  # creating the -wal and -shm files of a closed file needs room too
                raise StorageFull("%s (free: %d bytes)" % (e, free_bytes(path))) from e
            raise
        try:
            self.write(_create)
            # one scan at open instead of indexes: rows up to the floor are all acknowledged (new
            # rows get higher ids), and the pending retained state of each bin is known by id
            self._floor, self._pending_states = None, {}
            for row_id, topic, retain in self.db.execute(
                    "SELECT id, topic, retain FROM outbox WHERE acked_at IS NULL ORDER BY id"):
                if self._floor is None:
                    self._floor = row_id - 1
                if retain:
                    self._pending_states[topic] = row_id
            if self._floor is None:
                self._floor = self.db.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0]
        except BaseException:
            self.db.close()
            raise
        self.durable = durable
        self.synchronous = "FULL" if durable else "NORMAL"  # FULL: survives a power cut
        self._heads = None  # (counters, bins) as committed; loaded when first needed
        self._unsaved = ({}, {})  # the part of them only their outbox rows hold so far
        self._saved_at = time.monotonic()
        self._acks, self._deferred = [], set()  # broker acknowledgements not written yet: see defer_acks

    def close(self):
        if self._acks:
            try:
                self.write_acks()
            except StorageFull:
                pass  # published again after the restart, under the same ids
        if self.durable and any(self._unsaved):
            try:
                self.write(lambda db: _save_heads(db, *self._unsaved))
            except StorageFull:
                pass  # their rows still hold them
        self.db.close()

    def write(self, work):
        """Runs work(db) in one write transaction. A full disk raises StorageFull; SQLite may
        already have rolled the transaction back itself, so roll back only what is still open."""
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            result = work(db)
            db.execute("COMMIT")
            return result
        except BaseException as e:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the original error says more
            if isinstance(e, sqlite3.OperationalError) and is_full(e, self.path):
                raise StorageFull("%s (free: %d bytes)" % (e, free_bytes(self.path))) from e
            raise

    def commit(self, batch):
        """Writes a batch, and the acknowledgements deferred so far, in one transaction; returns the
        change in pending messages (the deferred ones were counted when deferred).

        A new retained state supersedes the bin's older pending one: only the newest state of a
        bin is worth publishing (after an outage, a backlog drains without a flood of stale states)."""
        counters, bins = self._load_heads()
        save_all = time.monotonic() - self._saved_at >= SAVE_HEADS_S
        state_ids, lazy = {}, ({}, {})
        acks = self._acks

        def work(db):
            _ack(db, acks, time.time())  # first: a state superseded below is then not counted twice
            return _commit(db, batch, self._pending_states, state_ids, counters, bins,
                           self._unsaved if save_all else None, lazy)
        pending = self.write(work)
        # only once committed
        self._acks, self._deferred = [], set()
        self._pending_states.update(state_ids)
        counters.update(batch.counters)
        bins.update(batch.bins)
        if save_all:
            self._unsaved, self._saved_at = lazy, time.monotonic()
        else:
            for unsaved, new, done in zip(self._unsaved, lazy, (batch.counters, batch.bins)):
                for k in done:
                    unsaved.pop(k, None)
                unsaved.update(new)
        return pending

    def counters(self):
        """device_id -> (last accepted fcnt, key_id)."""
        return dict(self._load_heads()[0])

    def bins(self):
        """bin_id -> (fcnt, fill_pct, flags, updated_at) of its newest state."""
        return dict(self._load_heads()[1])

    def _load_heads(self):
        if self._heads is None:
            self._heads = _load_heads(self.db)
        return self._heads

    def raise_counters(self, counters, bins):
        """Counters and bin states learnt elsewhere (the broker's retained states, after a state
        loss): a counter only ever moves up, a bin state is taken when newer than ours."""
        self.write(lambda db: _save_heads(db, counters, bins))
        self._heads = None

    def carry_over(self, counters, bins, rows):
        """What was read from a damaged state file: counters and bin states (with their upto_id)
        and outbox rows, which keep their ids."""
        # rows after the newest one carried over are new ones: they must carry the heads further
        top = max((r[0] for r in rows), default=0)
        counters = [tuple(c[:3]) + (min(c[3], top),) for c in counters]
        bins = [tuple(b[:5]) + (min(b[5], top),) for b in bins]

        def work(db):
            db.executemany("INSERT OR REPLACE INTO counters(device_id, last_fcnt, key_id, upto_id) VALUES (?,?,?,?)", counters)
            db.executemany("INSERT OR REPLACE INTO bins(bin_id, fcnt, fill_pct, flags, updated_at, upto_id) "
                           "VALUES (?,?,?,?,?,?)", bins)
            db.executemany("INSERT OR IGNORE INTO outbox(id, message_key, topic, payload, retain, received_at, acked_at, "
                           "superseded) VALUES (?,?,?,?,?,?,?,?)", rows)
        self.write(work)
        self._heads = None

    def pending(self, after_id, limit):
        """Unacknowledged messages after after_id, oldest first: (id, topic, payload, retain, received_at);
        payload None for a row that cannot be read (damaged on disk)."""
        rows = self.db.execute(
            "SELECT id, topic, payload, retain, received_at FROM outbox WHERE id > ? AND acked_at IS NULL ORDER BY id LIMIT ?",
            (max(after_id, self._floor), limit),
        ).fetchall()
        return [(i, topic, readable(payload), retain, at) for i, topic, payload, retain, at in rows]

    def defer_acks(self, ids):
        """Broker acknowledgements to be written with the next commit, in its transaction and
        fsync: at a site's few frames a minute, a transaction of their own would double what the
        SD card is written. Until written, a reconnect publishes them again under the same ids.
        Returns how many of them were still pending (a superseded state acknowledged after all
        was already off the books): the depth changes now, as the broker has them."""
        fresh = [i for i in ids if i not in self._deferred]
        self._acks += fresh
        self._deferred.update(fresh)
        count = "SELECT count(*) FROM outbox WHERE id BETWEEN ? AND ? AND acked_at IS NULL"
        return sum(self.db.execute(count, run).fetchone()[0] for run in runs(fresh))

    @property
    def acks_waiting(self):
        return len(self._acks)

    def write_acks(self, now=None):
        """Writes the deferred acknowledgements on their own (no commit came soon enough). Raises
        StorageFull: they stay deferred (not published twice meanwhile)."""
        # no fsync of its own: an ack lost in a power cut only means the message is published again
        # under the same id, and the next durable commit's fsync covers it anyway
        self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            self.write(lambda db: _ack(db, self._acks, time.time() if now is None else now))
        finally:
            self.db.execute("PRAGMA synchronous=%s" % self.synchronous)
        self._acks, self._deferred = [], set()

    def ack(self, ids, now=None):
        """Marks messages acknowledged now; returns how many were still pending."""
        pending = self.defer_acks(ids)
        self.write_acks(now)
        return pending

    def depth(self):
        """Counted from the table: at start-up; the gauge then follows commit() and ack()."""
        return self.db.execute("SELECT count(*) FROM outbox WHERE acked_at IS NULL").fetchone()[0]

    def prune(self, now=None):
        """Forgets old acknowledged messages; the newest row stays so that its id is never handed
        out again. On a full disk nothing is pruned this time (returns False)."""
        cutoff = (time.time() if now is None else now) - KEEP_ACKED_S

        def work(db):
            db.execute("DELETE FROM outbox WHERE acked_at IS NOT NULL AND acked_at < ? "
                       "AND id < (SELECT max(id) FROM outbox)", (cutoff,))
            db.execute("DELETE FROM receptions WHERE received_at < ?", (cutoff,))
        try:
            self.write(work)
        except StorageFull:
            return False
        return True


_INSERT = "INSERT OR IGNORE INTO outbox(message_key, topic, payload, retain, received_at) VALUES (?,?,?,?,?)"
NO_LATER_ROWS = 1 << 62  # upto_id for heads read from a file without the column: their table says it all


def _create(db):
    for stmt in SCHEMA.split(";"):
        if stmt.strip():
            db.execute(stmt)
    # Keys unique among events: a retained state is only ever written for a newer reading, and
    # leaving states out halves the index pages a reading touches. A file from before has the
    # whole column UNIQUE already (its autoindex), and a second index would only add pages.
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_autoindex_outbox_1'").fetchone():
        db.execute("CREATE UNIQUE INDEX IF NOT EXISTS outbox_event_key ON outbox(message_key) WHERE retain = 0")
    for table in ("counters", "bins"):  # a file from before upto_id: its tables hold everything so far
        if "upto_id" not in {r[1] for r in db.execute("PRAGMA table_info(%s)" % table)}:
            db.execute("ALTER TABLE %s ADD COLUMN upto_id INTEGER NOT NULL DEFAULT 0" % table)
            db.execute("UPDATE %s SET upto_id = (SELECT coalesce(max(id), 0) FROM outbox)" % table)


def message_key_counter(key):
    """(device_id, fcnt) of a message key "<device hex>:<key epoch>:<fcnt>[:<kind>]" (integrate.py),
    or of a file from before key epochs, "<device hex>:<fcnt>[:<kind>]"; else (None, None)."""
    parts = key.split(":")
    try:
        dev = int(parts[0], 16)
        if len(parts) >= 3 and parts[2].isdigit():
            return dev, int(parts[2])
        return dev, int(parts[1])
    except (ValueError, IndexError):
        return None, None


def _load_heads(db):
    """Heads as committed: the tables, carried further by the rows written after their upto_id.

    Counters and bin states are written to their tables only when a reading's own rows cannot
    tell them: a device or bin seen for the first time, a new key, a frame without a row of its
    own (a backlog batch's counter), and every SAVE_HEADS_S. Otherwise the `<device>:<fcnt>` key of
    the reading's event and its retained state, committed in the same transaction, carry them:
    two pages fewer written per reading, and nothing a power cut can take that the rows keep."""
    counters = {r[0]: list(r[1:]) for r in db.execute("SELECT device_id, last_fcnt, key_id, upto_id FROM counters")}
    bins = {r[0]: list(r[1:]) for r in db.execute("SELECT bin_id, fcnt, fill_pct, flags, updated_at, upto_id FROM bins")}
    uptos = [c[2] for c in counters.values()] + [b[4] for b in bins.values()]
    rows = db.execute("SELECT id, message_key, topic, payload, retain, received_at FROM outbox WHERE id > ? ORDER BY id",
                      (min(uptos),)) if uptos else ()
    for row_id, key, topic, payload, retain, at in rows:
        dev, fcnt = message_key_counter(key)
        c = counters.get(dev)
        if c is not None and row_id > c[2] and fcnt > c[0]:
            c[0] = fcnt
        parts = topic.rsplit("/", 2) if retain else ()  # <base>/bin/<bin_id>/state
        b = bins.get(parts[-2]) if len(parts) == 3 else None
        if b is not None and row_id > b[4] and fcnt > b[0]:
            try:
                state = json.loads(readable(payload))
            except (TypeError, ValueError):  # damaged: its counter still counts, its level is unknown
                state = {"fill_pct": None, "flags": codec.flag_names(b[2])}
            fill = state.get("fill_pct")  # a faulty reading keeps the bin's last level
            b[:4] = [fcnt, b[1] if fill is None else fill, codec.flag_bits(state.get("flags") or []), at]
    return {d: (c[0], c[1]) for d, c in counters.items()}, {b: tuple(v[:4]) for b, v in bins.items()}


def _save_heads(db, counters, bins):
    """Writes heads to their tables, as of the newest outbox row; a counter only moves up (or to a new key)."""
    upto = db.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0]
    db.executemany(
        "INSERT INTO counters(device_id, last_fcnt, key_id, upto_id) VALUES (?,?,?,?) "
        "ON CONFLICT(device_id) DO UPDATE SET last_fcnt=excluded.last_fcnt, key_id=excluded.key_id, upto_id=excluded.upto_id "
        "WHERE excluded.last_fcnt >= last_fcnt OR excluded.key_id != key_id",
        [(d, f, k, upto) for d, (f, k) in counters.items()])
    db.executemany(
        "INSERT INTO bins(bin_id, fcnt, fill_pct, flags, updated_at, upto_id) VALUES (?,?,?,?,?,?) "
        "ON CONFLICT(bin_id) DO UPDATE SET fcnt=excluded.fcnt, fill_pct=excluded.fill_pct, flags=excluded.flags, "
        "updated_at=excluded.updated_at, upto_id=excluded.upto_id WHERE excluded.fcnt >= fcnt",
        [(b,) + tuple(v) + (upto,) for b, v in bins.items()])


def runs(ids):
    """Ids as (first, last) runs of consecutive ones, ascending: the broker acknowledges a window
    of rows in the order they were written, so a few ranges stand for thousands of ids."""
    out = []
    for i in sorted(ids):
        if out and i <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], i)
        else:
            out.append([i, i])
    return out


def _ack(db, ids, now):
    if ids:
        db.executemany("UPDATE outbox SET acked_at=? WHERE id BETWEEN ? AND ? AND acked_at IS NULL",
                       [(now, first, last) for first, last in runs(ids)])


def _commit(db, batch, pending_states, new_state_ids, counters, bins, save_all, lazy):
    """pending_states: topic -> id of a retained state that may still be pending (a superset: one
    acknowledged since is left alone by the acked_at test). new_state_ids gets the states written.
    counters, bins: the heads as committed; save_all: the unsaved heads when it is time to write
    them all, else None; lazy gets the heads this batch leaves to its rows."""
    messages = [(k, t, pack(p), r, at) for k, t, p, r, at in batch.messages]
    pending = db.executemany(_INSERT, messages).rowcount
    proven = {message_key_counter(m[0]) for m in messages} if pending == len(messages) else set()
    proven_bins = set()
    states = batch.states
    superseded = [(m[4], pending_states[m[1]]) for m in states.values() if m[1] in pending_states]
    if superseded:
        pending -= db.executemany("UPDATE outbox SET acked_at = ?, superseded = 1 WHERE id = ? AND acked_at IS NULL",
                                  superseded).rowcount
    if states:
        top = db.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0]
        pending += db.executemany(_INSERT, [(m[0], m[1], pack(m[2]), m[3], m[4]) for m in states.values()]).rowcount
        # the rows above the highest id are the states just written (a state already stored is skipped)
        written = dict(db.execute("SELECT message_key, id FROM outbox WHERE id > ?", (top,)))
        for bin_id, m in states.items():
            row_id = written.get(m[0])
            if row_id is not None:
                new_state_ids[m[1]] = row_id
                proven_bins.add(bin_id)
    save_c, save_b = ({}, {}) if save_all is None else (dict(save_all[0]), dict(save_all[1]))
    for d, v in batch.counters.items():
        told = d in counters and counters[d][1] == v[1] and (d, v[0]) in proven
        (lazy[0] if told and save_all is None else save_c)[d] = v
    for b, v in batch.bins.items():
        told = b in bins and b in proven_bins
        (lazy[1] if told and save_all is None else save_b)[b] = v
    if save_c or save_b:
        _save_heads(db, save_c, save_b)
    db.executemany("INSERT INTO receptions VALUES (?,?,?,?,?,?,?)", batch.receptions)
    return pending
