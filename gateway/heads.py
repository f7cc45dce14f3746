"""Counters and bin states, as the state file holds them: their tables, carried further by the
reading rows written after them.

Counters and bin states are written to their tables only when a reading's own rows cannot tell
them: a device or bin seen for the first time, a new key, a frame without a row of its own (a
backlog batch's counter), and every SAVE_HEADS_S (outbox.py). Otherwise the columns of the
reading's rows (device, key epoch, counter; a state's bin), committed in the same transaction,
carry them: two pages fewer written per reading, and nothing a power cut can take that the rows
keep. Rows without a counter (notices, a retired bin's clearing messages) carry nothing."""
import logging
from typing import NamedTuple

from binlink.gateway import integrate, logs

log = logs.get("pipeline")


WINDOW = 256  # a backlog entry is at most 255 counters behind its frame (codec: a one-byte offset)


class Counter(NamedTuple):
    """A device's last accepted frame counter, under the key with this fingerprint and epoch, and
    which of the readings in the WINDOW below it are stored (bit k: counter fcnt - k): a backlog
    entry repeating a stored reading is not stored again."""
    fcnt: int
    key_id: str
    key_epoch: int | None  # None: migrated from a file that did not say
    stored: int = 0


def without_older_keys(devices, counters):
    """The registry's devices less those whose key epoch is older than the one their counter was
    last accepted under: an old registry backup restored would accept the old key's recorded
    frames again (and roll the retained state back). Each one left out is said."""
    older = {d for d, c in counters.items() if d in devices and c.key_epoch is not None
             and devices[d].key_epoch < c.key_epoch}
    for d in sorted(older):
        logs.event(log, logging.ERROR, "registry entry refused: its key epoch is older than the one this gateway "
                   "already accepted (an old registry backup?); the bin is not heard until it is re-keyed",
                   bin=devices[d].bin_id, registry_key_epoch=devices[d].key_epoch, state_key_epoch=counters[d].key_epoch)
    return {d: v for d, v in devices.items() if d not in older}


def shifted(stored, by):
    """The stored-readings window of a counter that moved forward by `by`."""
    return (stored << by) & ((1 << WINDOW) - 1) if by < WINDOW else 0


class BinState(NamedTuple):
    """A bin's newest reading: what its next reading's events are compared with."""
    key_epoch: int | None  # the epoch fcnt counts in (None: migrated, taken as the device's now)
    fcnt: int
    fill_pct: float | None
    flags: int
    updated_at: float

    def is_newer(self, key_epoch, fcnt):
        """Does a reading (key_epoch, fcnt) come after this state? A new key's counter starts again."""
        mine = key_epoch if self.key_epoch is None else self.key_epoch
        return (key_epoch, fcnt) > (mine, self.fcnt)


UPLINK_KIND, STATE_KIND = 0, 1  # outbox.Kind.UPLINK and STATE (imported there from here would be circular)


def _uint32(v):
    return type(v) is int and 0 <= v <= 0xFFFFFFFF


def _epoch(v):
    return v is None or _uint32(v)


def _counter_row(last, key_id, epoch, stored, upto):
    """A counters row read back, checked as strictly as a frame (a damaged row is passed over)."""
    return (_uint32(last) and type(key_id) is str and _epoch(epoch) and type(upto) is int
            and (stored is None or type(stored) is bytes and len(stored) <= WINDOW // 8))


def _bin_row(epoch, fcnt, fill, flags, at, upto):
    return (_epoch(epoch) and _uint32(fcnt) and type(flags) is int and 0 <= flags <= 0xFF
            and (fill is None or type(fill) in (int, float) and 0 <= fill <= 100)
            and type(at) in (int, float) and type(upto) is int)


def load(db):
    """(counters, bins) as committed: device_id -> Counter, bin_id -> BinState. What the file holds
    is input like a frame: rows with values no writer of it makes are passed over."""
    counters = {r[0]: [Counter(r[1], r[2], r[3], int.from_bytes(r[4] or b"", "little")), r[5]] for r in db.execute(
        "SELECT device_id, last_fcnt, key_id, key_epoch, stored, upto_id FROM counters") if _counter_row(*r[1:])}
    bins = {r[0]: [BinState(*r[1:6]), r[6]] for r in db.execute(
        "SELECT bin_id, key_epoch, fcnt, fill_pct, flags, updated_at, upto_id FROM bins") if _bin_row(*r[1:])}
    uptos = [c[1] for c in counters.values()] + [b[1] for b in bins.values()]
    rows = db.execute("SELECT id, kind, device_id, key_epoch, fcnt, bin_id, payload, received_at FROM outbox "
                      "WHERE id > ? AND fcnt IS NOT NULL ORDER BY id", (min(uptos),)) if uptos else ()
    readings = {}  # device_id -> counters of the readings its rows after upto store
    for row_id, kind, device_id, epoch, fcnt, bin_id, payload, at in rows:
        if not (_uint32(fcnt) and _uint32(epoch) and type(at) in (int, float)):
            continue  # damaged: carries nothing
        entry = counters.get(device_id)
        if entry is not None and row_id > entry[1]:
            c = entry[0]
            if c.key_epoch is None or c.key_epoch == epoch:
                if fcnt > c.fcnt:
                    entry[0] = c._replace(fcnt=fcnt, key_epoch=epoch, stored=shifted(c.stored, fcnt - c.fcnt))
                if kind == UPLINK_KIND:
                    readings.setdefault(device_id, []).append(fcnt)
        entry = bins.get(bin_id) if kind == STATE_KIND else None
        if entry is not None and row_id > entry[1] and entry[0].is_newer(epoch, fcnt):
            b = entry[0]
            fill, flags = integrate.state_of(payload)
            if flags is None:  # damaged: its counter still counts, its level is unknown
                fill, flags = None, b.flags
            entry[0] = BinState(epoch, fcnt, b.fill_pct if fill is None else fill, flags, at)  # a fault keeps the level
    for device_id, fcnts in readings.items():
        c = counters[device_id][0]
        counters[device_id][0] = c._replace(stored=c.stored | sum(1 << (c.fcnt - f) for f in fcnts if c.fcnt - f < WINDOW))
    return {d: e[0] for d, e in counters.items()}, {b: e[0] for b, e in bins.items()}


def save(db, counters, bins):
    """Writes heads to their tables, as of the newest outbox row. A counter only moves up (or to a
    new key); a bin state only to a newer reading."""
    upto = db.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0]
    db.executemany(
        "INSERT INTO counters(device_id, last_fcnt, key_id, key_epoch, stored, upto_id) VALUES (?,?,?,?,?,?) "
        "ON CONFLICT(device_id) DO UPDATE SET last_fcnt=excluded.last_fcnt, key_id=excluded.key_id, "
        "key_epoch=excluded.key_epoch, stored=excluded.stored, upto_id=excluded.upto_id "
        "WHERE excluded.last_fcnt >= last_fcnt OR excluded.key_id != key_id",
        [(d, c.fcnt, c.key_id, c.key_epoch, c.stored.to_bytes(WINDOW // 8, "little"), upto) for d, c in counters.items()])
    db.executemany(
        "INSERT INTO bins(bin_id, key_epoch, fcnt, fill_pct, flags, updated_at, upto_id) VALUES (?,?,?,?,?,?,?) "
        "ON CONFLICT(bin_id) DO UPDATE SET key_epoch=excluded.key_epoch, fcnt=excluded.fcnt, fill_pct=excluded.fill_pct, "
        "flags=excluded.flags, updated_at=excluded.updated_at, upto_id=excluded.upto_id "
        "WHERE (coalesce(excluded.key_epoch, -1), excluded.fcnt) >= (coalesce(key_epoch, excluded.key_epoch, -1), fcnt)",
        [(b,) + tuple(s) + (upto,) for b, s in bins.items()])
