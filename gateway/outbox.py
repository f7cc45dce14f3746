"""Durable outbox: SQLite (WAL) holding every accepted reading's MQTT messages until the broker's
QoS 1 acknowledgement, with the per-device counters and per-bin states committed in the same
transaction — so a counter never advances for a reading that is not on disk, and vice versa.

The row layout and its migration are outbox_schema.py, payloads payloads.py, counters and bin
states derived from rows heads.py, SQLite settings and a full disk storage.py. No indexes on
pending rows (each is one more page written per reading and per ack on an SD card).

One Outbox, in the service's main thread: it holds the file alone (exclusive locking); the
publisher gets rows through outbox_feed.py, other commands queue through outbox_spool.py."""
import errno
import os
import sqlite3
import time
from enum import IntEnum
from typing import NamedTuple

from binlink.gateway import heads, outbox_schema, payloads, storage
from binlink.gateway.storage import StorageFull, free_bytes, is_full

__all__ = ["Batch", "Kind", "Message", "Outbox", "StorageFull", "runs"]
KEEP_ACKED_S = 7 * 24 * 3600  # acked keys kept this long so a late copy is not published again
SAVE_HEADS_S = 600.0  # counters and bin states proven by their rows are written to their tables this often


class Kind(IntEnum):
    """What an outbox row is (its `kind` column). Stored: never renumber."""
    UPLINK = heads.UPLINK_KIND  # a reading's event
    STATE = heads.STATE_KIND  # a bin's retained state
    ALARM = 2  # an event detected in a reading (emptied, full, fire, ...)
    HELLO = 3
    NOTICE = 4  # anything else: a rejection notice, the gateway's shared-state status, a retired bin's clearing


class Message(NamedTuple):
    """One MQTT message to store. A reading's messages name their device, key epoch and counter
    (they carry the device's counter through a power cut); a state names its bin."""
    key: str  # the message id
    topic: str
    payload: bytes | str
    retain: bool
    received_at: float
    kind: Kind = Kind.NOTICE
    device_id: int | None = None
    key_epoch: int | None = None
    fcnt: int | None = None
    bin_id: str | None = None


class Batch:
    """What one group commit writes."""

    def __init__(self):
        self.messages = []  # Message
        self.states = {}  # bin_id (or topic) -> retained Message: only the newest state of a group is kept
        self.counters = {}  # device_id -> heads.Counter
        self.bins = {}  # bin_id -> heads.BinState
        self.receptions = []  # extra receptions of accepted frames: (device_id, fcnt, source, rssi, snr, at, 1)
        self.accepted = 0  # frames accepted into this batch

    def __bool__(self):
        return bool(self.messages or self.states or self.counters or self.receptions)


class Outbox:
    def __init__(self, path):
        """Opens (creating or migrating) the state file at path and holds it alone (storage.connect)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        try:
            self.db = storage.connect(path)
        except sqlite3.OperationalError as e:
            if is_full(e, path):  # creating the -wal file of a closed file needs room too
                raise StorageFull("%s (free: %d bytes)" % (e, free_bytes(path))) from e
            raise
        try:
            self.db.execute("SELECT 1 FROM sqlite_master LIMIT 1")  # the file's lock taken before the marks
            if free_bytes(path) < storage.ROOM_TO_START:
                raise StorageFull("no room to start in (free: %d bytes)" % free_bytes(path))
            storage.mark_open(path)
            self.mark = storage.CommitMark(path)
            self.on_rows = lambda: None  # after each commit that stored rows: the service wakes its publisher
        except BaseException as e:
            self.db.close()
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise StorageFull("%s (free: %d bytes)" % (e, free_bytes(path))) from e
            raise
        try:
            self.write(outbox_schema.create_or_migrate)
            # one scan at open instead of indexes: rows up to the floor are all acknowledged (new
            # rows get higher ids), and the pending retained state of each topic is known by id
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
        if any(self._unsaved):
            try:
                self.write(lambda db: heads.save(db, *self._unsaved))
            except StorageFull:
                pass  # their rows still hold them
        self.db.close()
        storage.mark_closed(self.path)
        self.mark.close(remove=True)

    def write(self, work):
        """work(db) in one write transaction; a full disk raises StorageFull."""
        return storage.write(self.db, self.path, work)

    # readings in --------------------------------------------------------------------------------
    def commit(self, batch):
        """Writes a batch, and the acknowledgements deferred so far, in one transaction; returns the
        change in pending messages (the deferred ones were counted when deferred).

        A new retained state supersedes the topic's older pending one: only the newest state of a
        bin is worth publishing (after an outage, a backlog drains without a flood of stale states)."""
        counters, bins = self._load_heads()
        save_all = time.monotonic() - self._saved_at >= SAVE_HEADS_S
        written = {}
        lazy = ({}, {})
        acks = self._acks

        def work(db):
            _ack(db, acks, time.time())  # first: a state superseded below is then not counted twice
            pending = _store_messages(db, batch, self._pending_states, written)
            _store_heads(db, batch, counters, bins, written, self._unsaved if save_all else None, lazy)
            db.executemany("INSERT INTO receptions VALUES (?,?,?,?,?,?,?)", batch.receptions)
            return pending, self.newest_id() if batch.messages or batch.states else None
        pending, newest = self.write(work)
        # only once committed
        if newest is not None:
            self.mark.write(newest)
            self.on_rows()
        self._acks, self._deferred = [], set()
        self._pending_states.update(written)
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
        """device_id -> heads.Counter."""
        return dict(self._load_heads()[0])

    def bins(self):
        """bin_id -> heads.BinState of its newest reading."""
        return dict(self._load_heads()[1])

    def _load_heads(self):
        if self._heads is None:
            self._heads = heads.load(self.db)
        return self._heads

    def raise_counters(self, counters, bins):
        """Counters and bin states learnt elsewhere (the broker's retained states, after a state
        loss): a counter only ever moves up, a bin state is taken when newer than ours."""
        self.write(lambda db: heads.save(db, counters, bins))
        self._heads = None

    def carry_over(self, counters, bins, rows):
        """What was read from a damaged state file (salvage.salvage: counters and bin states with
        their upto_id, outbox rows), written as it was: rows keep their ids."""
        # rows after the newest one carried over are new ones: they must carry the heads further
        top = max((r[0] for r in rows), default=0)
        counters = [tuple(c[:-1]) + (min(c[-1], top),) for c in counters]
        bins = [tuple(b[:-1]) + (min(b[-1], top),) for b in bins]

        def work(db):
            db.executemany("INSERT OR REPLACE INTO counters(device_id, last_fcnt, key_id, key_epoch, stored, upto_id) "
                           "VALUES (?,?,?,?,?,?)", counters)
            db.executemany("INSERT OR REPLACE INTO bins(bin_id, key_epoch, fcnt, fill_pct, flags, updated_at, upto_id) "
                           "VALUES (?,?,?,?,?,?,?)", bins)
            db.executemany("INSERT OR IGNORE INTO outbox(id, message_key, topic, payload, retain, received_at, acked_at, "
                           "superseded, kind, device_id, key_epoch, fcnt, bin_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        self.write(work)
        self._heads = None

    # messages out -------------------------------------------------------------------------------
    def pending(self, after_id, limit):
        """Unacknowledged messages after after_id, oldest first: (id, topic, payload as stored, retain,
        received_at); the publisher process renders the payloads (outbox_feed.rendered)."""
        return self.db.execute(
            "SELECT id, topic, payload, retain, received_at FROM outbox WHERE id > ? AND acked_at IS NULL ORDER BY id LIMIT ?",
            (max(after_id, self._floor), limit),
        ).fetchall()

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
            self.db.execute("PRAGMA synchronous=FULL")
        self._acks, self._deferred = [], set()

    def ack(self, ids, now=None):
        """Marks messages acknowledged now; returns how many were still pending."""
        pending = self.defer_acks(ids)
        self.write_acks(now)
        return pending

    def newest_id(self):
        """The newest row's id: prune() keeps it, so it only ever grows."""
        return self.db.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0]

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


_INSERT = ("INSERT OR IGNORE INTO outbox(message_key, topic, payload, retain, received_at, kind, device_id, key_epoch, "
           "fcnt, bin_id) VALUES (?,?,?,?,?,?,?,?,?,?)")


def _row(m):
    return (m.key, m.topic, payloads.pack(m.payload), m.retain, m.received_at, m.kind, m.device_id, m.key_epoch,
            m.fcnt, m.bin_id)


def _store_messages(db, batch, pending_states, written):
    """Inserts the batch's messages and states; returns the change in pending rows. pending_states:
    topic -> id of a retained message that may still be pending (a superset: one acknowledged since
    is left alone by the acked_at test). written gets topic -> id of the states stored, and
    "events" whether every event was stored (a file from before 0.4 may refuse a copy)."""
    rows = [_row(m) for m in batch.messages]
    pending = stored = db.executemany(_INSERT, rows).rowcount
    written["events"] = stored == len(rows)  # every event of the batch is new: each carries its counter
    states = batch.states.values()
    superseded = [(m.received_at, pending_states[m.topic]) for m in states if m.topic in pending_states]
    if superseded:
        pending -= db.executemany("UPDATE outbox SET acked_at = ?, superseded = 1 WHERE id = ? AND acked_at IS NULL",
                                  superseded).rowcount
    for m in states:  # refused only by a file from before 0.4 whose key column is UNIQUE, for a state stored before
        cur = db.execute(_INSERT, _row(m))
        if cur.rowcount:
            pending += 1
            written[m.topic] = cur.lastrowid
    return pending


def _store_heads(db, batch, counters, bins, written, save_all, lazy):
    """counters, bins: the heads as committed; save_all: the unsaved heads when it is time to write
    them all, else None; lazy gets the heads this batch leaves to its rows."""
    carried = written.pop("events")
    proven = {(m.device_id, m.key_epoch, m.fcnt) for m in batch.messages} if carried else set()
    proven_bins = {m.bin_id for m in batch.states.values() if m.kind == Kind.STATE and m.topic in written}
    save_c, save_b = ({}, {}) if save_all is None else (dict(save_all[0]), dict(save_all[1]))
    for d, c in batch.counters.items():
        told = d in counters and counters[d].key_id == c.key_id and (d, c.key_epoch, c.fcnt) in proven
        (lazy[0] if told and save_all is None else save_c)[d] = c
    for b, s in batch.bins.items():
        told = b in bins and b in proven_bins
        (lazy[1] if told and save_all is None else save_b)[b] = s
    if save_c or save_b:
        heads.save(db, save_c, save_b)


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
