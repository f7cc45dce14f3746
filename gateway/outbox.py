"""Durable outbox: SQLite (WAL) holding every accepted reading's MQTT messages until the broker's
QoS 1 acknowledgement, with the per-device counters and per-bin state committed in the same
transaction — so a counter never advances for a reading that is not on disk, and vice versa.

One Outbox object per thread (SQLite connections are not shared across threads)."""
import os
import sqlite3
import time

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_key TEXT NOT NULL UNIQUE,   -- <device>:<fcnt>[:<kind>]: a reading is stored once
    topic TEXT NOT NULL,
    payload TEXT NOT NULL,
    retain INTEGER NOT NULL,
    received_at REAL NOT NULL,
    acked_at REAL,                      -- broker's PUBACK (or superseded, for a retained state)
    superseded INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(id) WHERE acked_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_pending_retained ON outbox(topic) WHERE acked_at IS NULL AND retain = 1;
CREATE TABLE IF NOT EXISTS counters (
    device_id INTEGER PRIMARY KEY, last_fcnt INTEGER NOT NULL,
    key_id TEXT NOT NULL                -- fingerprint of the key the counter was accepted under
);
CREATE TABLE IF NOT EXISTS bins (
    bin_id TEXT PRIMARY KEY, fcnt INTEGER NOT NULL, fill_pct REAL, flags INTEGER NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS receptions (
    device_id INTEGER NOT NULL, fcnt INTEGER NOT NULL, source TEXT NOT NULL, rssi INTEGER, snr REAL,
    received_at REAL NOT NULL, duplicate INTEGER NOT NULL
);
"""
KEEP_ACKED_S = 7 * 24 * 3600  # acked keys kept this long so a late copy is not published again


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


class Outbox:
    def __init__(self, path, durable=True):
        """durable=False (the publisher's connection): an ack lost in a power cut only means the
        message is published again under the same id, so acks skip the fsync."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=True)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.synchronous = "FULL" if durable else "NORMAL"  # FULL: survives a power cut
        self.db.execute("PRAGMA synchronous=%s" % self.synchronous)
        self.db.executescript(SCHEMA)

    def close(self):
        self.db.close()

    def commit(self, batch):
        """Writes a batch in one transaction; returns the change in pending messages.

        A new retained state supersedes the bin's older pending one: only the newest state of a
        bin is worth publishing (after an outage, a backlog drains without a flood of stale states)."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        insert = "INSERT OR IGNORE INTO outbox(message_key, topic, payload, retain, received_at) VALUES (?,?,?,?,?)"
        try:
            pending = db.executemany(insert, batch.messages).rowcount
            states = list(batch.states.values())
            if states:
                pending -= db.executemany(
                    "UPDATE outbox SET acked_at = ?, superseded = 1 WHERE topic = ? AND retain = 1 AND acked_at IS NULL",
                    [(m[4], m[1]) for m in states],
                ).rowcount
                pending += db.executemany(insert, states).rowcount
            db.executemany(
                "INSERT INTO counters(device_id, last_fcnt, key_id) VALUES (?,?,?) "
                "ON CONFLICT(device_id) DO UPDATE SET last_fcnt=excluded.last_fcnt, key_id=excluded.key_id "
                "WHERE excluded.last_fcnt > last_fcnt OR excluded.key_id != key_id",
                [(d,) + v for d, v in batch.counters.items()],
            )
            db.executemany(
                "INSERT OR REPLACE INTO bins(bin_id, fcnt, fill_pct, flags, updated_at) VALUES (?,?,?,?,?)",
                [(b,) + v for b, v in batch.bins.items()],
            )
            db.executemany("INSERT INTO receptions VALUES (?,?,?,?,?,?,?)", batch.receptions)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return pending

    def counters(self):
        """device_id -> (last accepted fcnt, key_id)."""
        return {r[0]: (r[1], r[2]) for r in self.db.execute("SELECT device_id, last_fcnt, key_id FROM counters")}

    def bins(self):
        return {r[0]: r[1:] for r in self.db.execute("SELECT bin_id, fcnt, fill_pct, flags, updated_at FROM bins")}

    def pending(self, after_id, limit):
        """Unacknowledged messages after after_id, oldest first: (id, topic, payload, retain, received_at)."""
        return self.db.execute(
            "SELECT id, topic, payload, retain, received_at FROM outbox WHERE acked_at IS NULL AND id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()

    def ack(self, ids, now=None):
        """Marks messages acknowledged; returns how many were still pending (a superseded state
        acknowledged after all was already off the books)."""
        now = time.time() if now is None else now
        # no fsync of its own: an ack lost in a power cut only means the message is published again
        # under the same id, and the next durable commit's fsync covers it anyway
        self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            self.db.execute("BEGIN IMMEDIATE")
            done = self.db.executemany("UPDATE outbox SET acked_at=? WHERE id=? AND acked_at IS NULL",
                                       [(now, i) for i in ids]).rowcount
            self.db.execute("COMMIT")
        finally:
            self.db.execute("PRAGMA synchronous=%s" % self.synchronous)
        return done

    def depth(self):
        """Counted from the table: at start-up; the gauge then follows commit() and ack()."""
        return self.db.execute("SELECT count(*) FROM outbox WHERE acked_at IS NULL").fetchone()[0]

    def prune(self, now=None):
        now = time.time() if now is None else now
        self.db.execute("DELETE FROM outbox WHERE acked_at IS NOT NULL AND acked_at < ?", (now - KEEP_ACKED_S,))
        self.db.execute("DELETE FROM receptions WHERE received_at < ?", (now - KEEP_ACKED_S,))
