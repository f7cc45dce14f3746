"""Salvage of a damaged state file: whatever rows SQLite can still read from it, carried over
into the fresh outbox.

A damaged b-tree is read around: a table that fails as a whole is read by rowid ranges, halved
until only the unreadable rows are left out (a budget of queries bounds the search). Messages keep
their ids in the fresh file, so the counters' and bin states' upto_id still say which rows may
carry them further. Start-up (recovery.py) decides when a file is damaged and moves it aside."""
import sqlite3

NO_LATER_ROWS = 1 << 62  # upto_id for heads read from a file without the column: their table says it all
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
