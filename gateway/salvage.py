"""Salvage of a damaged state file: whatever rows SQLite can still read from it, carried over
into the fresh outbox.

A damaged b-tree is read around: a table that fails as a whole is read by rowid ranges, halved
until only the unreadable rows are left out (a budget of queries bounds the search). Messages keep
their ids in the fresh file, so the counters' and bin states' upto_id still say which rows may
carry them further. Start-up (recovery.py) decides when a file is damaged and moves it aside.

A file cut short (shorter than the page count its header names) is read from a copy padded with
zeros to that length: SQLite refuses every page of a table whose b-tree points past the end of the
file, so the cut file itself often reads as nothing; the padded copy reads every page still there.
Counters and bin states are then rebuilt from the salvaged rows themselves (their device, key
epoch and counter columns): a counters table lost or behind its rows must not let a replay in."""
import os
import shutil
import sqlite3

from binlink.gateway import heads, integrate

NO_LATER_ROWS = 1 << 62  # upto_id for heads read from a file without the column: their table says it all
_TABLES = {  # table -> columns read, as Outbox.carry_over writes them
    "counters": ("device_id", "last_fcnt", "key_id", "key_epoch", "stored", "upto_id"),
    "outbox": ("id", "message_key", "topic", "payload", "retain", "received_at", "acked_at", "superseded", "kind",
               "device_id", "key_epoch", "fcnt", "bin_id"),
    "bins": ("bin_id", "key_epoch", "fcnt", "fill_pct", "flags", "updated_at", "upto_id"),
}
_MISSING = {"upto_id": str(NO_LATER_ROWS)}  # a column a file from before lacks -> what stands for it (else NULL)


def header_size(path):
    """(page_size, page_count) the file's header names, or None when the header is unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError:
        return None
    if len(head) < 100 or not head.startswith(b"SQLite format 3\0"):
        return None
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(head[28:32], "big")  # "in-header database size"
    if page_size < 512 or page_size & (page_size - 1) or pages == 0:
        return None
    return page_size, pages


def salvage(damaged_path):
    """Whatever rows of the damaged file SQLite can read: table -> rows. A file shorter than its
    header says is read from a copy padded with zeros (next to it, removed after), and from the
    file itself; per table, whichever gives more rows wins."""
    out = _salvage(damaged_path)
    size = header_size(damaged_path)
    try:
        short = size is not None and os.path.getsize(damaged_path) < size[0] * size[1]
    except OSError:
        short = False
    if not short:
        return out
    padded = damaged_path + ".padded"
    try:
        shutil.copyfile(damaged_path, padded)
        if os.path.exists(damaged_path + "-wal"):  # its newest pages, if any
            shutil.copyfile(damaged_path + "-wal", padded + "-wal")
        with open(padded, "r+b") as f:
            f.truncate(size[0] * size[1])  # the missing tail reads as zeros
        for table, rows in _salvage(padded).items():
            if len(rows) > len(out.get(table, ())):
                out[table] = rows
    except OSError:
        pass  # no room for the copy: what the file itself gave
    finally:
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(padded + suffix)
            except OSError:
                pass
    return out


def _salvage(damaged_path):
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
            if not have:  # the table is gone (dropped): nothing to read around
                out[table] = []
                continue
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


def carry_over(box, rows, report, devices=None):
    """Writes salvaged rows into the fresh outbox: messages keep their ids, so the counters' and
    bin states' upto_id still say which rows may carry them further. Then counters and bin states
    are rebuilt from every salvaged row, whatever their tables said: a counters table lost (or
    behind its rows) must not let a recorded copy of a pending frame in again.
    devices: device_id -> registry.Device (the key a rebuilt counter belongs to)."""
    messages = rows.get("outbox", [])
    box.carry_over(rows.get("counters", []), rows.get("bins", []), messages)
    ids = sorted(r[0] for r in messages)
    report.unreadable_rows = (ids[-1] - ids[0] + 1 - len(ids)) if ids else 0
    report.salvaged = {"counters": len(rows.get("counters", [])), "bins": len(rows.get("bins", [])),
                       "outbox": len(messages), "pending": sum(1 for r in messages if r[6] is None)}
    report.highest_row_id = ids[-1] if ids else 0
    counters, bins = rebuilt_heads(messages, box.counters(), box.bins(), devices or {})
    if counters or bins:
        box.raise_counters(counters, bins)
    report.rebuilt = {"counters": len(counters), "bins": len(bins)}


def rebuilt_heads(messages, local_counters, local_bins, devices):
    """(counters, bin states) that salvaged outbox rows prove and the local ones lack: per device,
    the highest fcnt of its rows under its current key epoch (a row of an older key counts for
    nothing); per bin, its newest state row. Only what is ahead of the local heads is returned."""
    tops, readings, states = {}, {}, {}
    for row in messages:
        payload, at, kind, device_id, epoch, fcnt, bin_id = row[3], row[5], row[8], row[9], row[10], row[11], row[12]
        if device_id is None or fcnt is None:
            continue
        key = (device_id, 0 if epoch is None else epoch)
        tops[key] = max(tops.get(key, -1), fcnt)
        if kind == heads.UPLINK_KIND:
            readings.setdefault(key, []).append(fcnt)
        if kind == heads.STATE_KIND and bin_id is not None:
            newest = states.get(bin_id)
            if newest is None or (key[1], fcnt) > (newest[0], newest[1]):
                states[bin_id] = (key[1], fcnt, payload, at, device_id)
    counters = {}
    for (device_id, epoch), top in tops.items():
        device, local = devices.get(device_id), local_counters.get(device_id)
        if device is not None:
            if epoch != device.key_epoch:
                continue  # an older key's rows: the new key's counter starts again
            key_id = device.key_id
        elif local is not None and (local.key_epoch is None or local.key_epoch == epoch):
            key_id = local.key_id
        else:
            continue  # a device not known here: none of its frames is accepted anyway
        if local is not None and local.key_id == key_id and local.fcnt >= top:
            continue
        stored = heads.shifted(local.stored, top - local.fcnt) if local is not None and local.key_id == key_id else 0
        stored |= sum(1 << (top - f) for f in readings.get((device_id, epoch), ()) if top - f < heads.WINDOW)
        counters[device_id] = heads.Counter(top, key_id, epoch, stored)
    bins = {}
    for bin_id, (epoch, fcnt, payload, at, device_id) in states.items():
        device, local = devices.get(device_id), local_bins.get(bin_id)
        if device is not None and epoch != device.key_epoch:
            continue
        if local is not None and not local.is_newer(epoch, fcnt):
            continue
        fill, flags = integrate.state_of(payload)
        if flags is None:  # damaged: its counter still counts, its level is unknown
            fill, flags = (local.fill_pct, local.flags) if local is not None else (None, 0)
        bins[bin_id] = heads.BinState(epoch, fcnt, fill, flags, at)
    return counters, bins
