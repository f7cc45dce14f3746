"""The state file's tables, and the one-time migration of files written before 0.4.

Since 0.4 (user_version 1) every outbox row says, in columns, what recovery needs of it: the
device, key epoch and counter of the reading it belongs to, its kind and its bin. Nothing is
recovered by parsing a message key or a topic. Files from before are migrated once at start: the
counters and bin states their rows carry are worked out the old way (the only place that still
reads message keys) and written to their tables as of the newest row, so no old row is ever read
for them again."""
import json
import sqlite3

from binlink.wire import codec
from binlink.gateway import payloads

VERSION = 1  # PRAGMA user_version of a current file

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,             -- never reused: prune() keeps the newest row
    message_key TEXT NOT NULL,          -- the message id consumers deduplicate by
    topic TEXT NOT NULL,
    payload TEXT NOT NULL,              -- payloads.py
    retain INTEGER NOT NULL,
    received_at REAL NOT NULL,
    acked_at REAL,                      -- broker's PUBACK (or superseded, for a retained state)
    superseded INTEGER NOT NULL DEFAULT 0,
    kind INTEGER,                       -- outbox.Kind
    device_id INTEGER, key_epoch INTEGER, fcnt INTEGER,  -- the reading's, for counters (NULL: none)
    bin_id TEXT                         -- a state's bin, for bin states
);
-- No index at all: each would be one more page written per reading (a reading is stored once by
-- its counter, a backlog entry repeating one by the counters' stored-readings window, heads.py).
DROP INDEX IF EXISTS outbox_pending;
DROP INDEX IF EXISTS outbox_pending_retained;
DROP INDEX IF EXISTS outbox_event_key;
-- Counters and bin states as of outbox row upto_id: the rows after it (the readings themselves,
-- committed with them) may carry them further (heads.py).
CREATE TABLE IF NOT EXISTS counters (
    device_id INTEGER PRIMARY KEY, last_fcnt INTEGER NOT NULL,
    key_id TEXT NOT NULL,               -- fingerprint of the key the counter was accepted under
    upto_id INTEGER NOT NULL DEFAULT 0,
    key_epoch INTEGER,                  -- that key's epoch (NULL: migrated, not known)
    stored BLOB                         -- heads.Counter.stored, little-endian (NULL: none known)
);
CREATE TABLE IF NOT EXISTS bins (
    bin_id TEXT PRIMARY KEY, fcnt INTEGER NOT NULL, fill_pct REAL, flags INTEGER NOT NULL, updated_at REAL NOT NULL,
    upto_id INTEGER NOT NULL DEFAULT 0,
    key_epoch INTEGER                   -- the epoch fcnt counts in (NULL: migrated, not known)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS receptions (
    device_id INTEGER NOT NULL, fcnt INTEGER NOT NULL, source TEXT NOT NULL, rssi INTEGER, snr REAL,
    received_at REAL NOT NULL, duplicate INTEGER NOT NULL
);
"""
NEW_COLUMNS = {
    "outbox": ("kind INTEGER", "device_id INTEGER", "key_epoch INTEGER", "fcnt INTEGER", "bin_id TEXT"),
    "counters": ("upto_id INTEGER NOT NULL DEFAULT 0", "key_epoch INTEGER", "stored BLOB"),
    "bins": ("upto_id INTEGER NOT NULL DEFAULT 0", "key_epoch INTEGER"),
}


def columns(db, table):
    return {r[1] for r in db.execute("PRAGMA table_info(%s)" % table)}


def create_or_migrate(db):
    """Inside a write transaction: a new file gets the tables, a file from before is migrated."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > VERSION:
        raise sqlite3.DatabaseError("the state file was written by a newer binlink (format %d, this one reads %d): "
                                    "downgrading needs a drained outbox and a fresh state file" % (version, VERSION))
    existed = bool(db.execute("SELECT 1 FROM sqlite_master WHERE name = 'outbox'").fetchone())
    heads = None
    if existed and version < VERSION:
        if "upto_id" not in columns(db, "counters"):  # a file from before upto_id: its tables hold everything so far
            for table in ("counters", "bins"):
                db.execute("ALTER TABLE %s ADD COLUMN upto_id INTEGER NOT NULL DEFAULT 0" % table)
        heads = legacy_heads(db)
        for table, added in NEW_COLUMNS.items():
            have = columns(db, table)
            for column in added:
                if column.split()[0] not in have:
                    db.execute("ALTER TABLE %s ADD COLUMN %s" % (table, column))
    for stmt in SCHEMA.split(";"):
        if stmt.strip():
            db.execute(stmt)
    if heads is not None:
        upto = db.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0]
        db.executemany("UPDATE counters SET last_fcnt = ?, upto_id = ? WHERE device_id = ?",
                       [(fcnt, upto, dev) for dev, fcnt in heads[0].items()])
        db.executemany("UPDATE bins SET fcnt = ?, fill_pct = ?, flags = ?, updated_at = ?, upto_id = ? WHERE bin_id = ?",
                       [tuple(v) + (upto, b) for b, v in heads[1].items()])
    if version != VERSION:  # written only when it changes: the publisher opens the file on a full disk too
        db.execute("PRAGMA user_version = %d" % VERSION)


def legacy_heads(db):
    """Counters and bin states of a file from before 0.4: its tables, carried further by the rows
    after their upto_id, told apart by message keys "<device hex>:<epoch>:<fcnt>[:<kind>]" (or
    "<device hex>:<fcnt>[:<kind>]" before key epochs) and state topics "<base>/bin/<bin>/state".
    Rows with other keys (notices, a retired bin's clearing messages) carry nothing."""
    counters = {r[0]: [r[1], r[2]] for r in db.execute("SELECT device_id, last_fcnt, upto_id FROM counters")}
    bins = {r[0]: [r[1], r[2], r[3], r[4], r[5]] for r in db.execute(
        "SELECT bin_id, fcnt, fill_pct, flags, updated_at, upto_id FROM bins")}
    uptos = [c[1] for c in counters.values()] + [b[4] for b in bins.values()]
    rows = db.execute("SELECT id, message_key, topic, payload, retain, received_at FROM outbox WHERE id > ? ORDER BY id",
                      (min(uptos),)).fetchall() if uptos else ()
    for row_id, key, topic, payload, retain, at in rows:
        dev, fcnt = legacy_key_counter(key)
        if fcnt is None:
            continue
        c = counters.get(dev)
        if c is not None and row_id > c[1] and fcnt > c[0]:
            c[0] = fcnt
        parts = topic.rsplit("/", 2) if retain else ()
        b = bins.get(parts[-2]) if len(parts) == 3 and parts[-1] == "state" else None
        if b is not None and row_id > b[4] and fcnt > b[0]:
            try:
                state = json.loads(payloads.readable(payload))
                fill, flags = state.get("fill_pct"), codec.flag_bits(state.get("flags") or [])
            except (TypeError, ValueError, AttributeError):  # damaged: its counter still counts, its level is unknown
                fill, flags = None, b[2]
            b[:4] = [fcnt, b[1] if fill is None else fill, flags, at]  # a faulty reading keeps the last level
    return {d: c[0] for d, c in counters.items()}, {b: v[:4] for b, v in bins.items()}


def legacy_key_counter(key):
    """(device_id, fcnt) of a message key written before 0.4, else (None, None)."""
    parts = key.split(":")
    try:
        dev = int(parts[0], 16)
        if len(parts) >= 3 and parts[2].isdigit():
            return dev, int(parts[2])
        return dev, int(parts[1])
    except (ValueError, IndexError):
        return None, None
