"""What the planner remembers: every bin state the broker published, kept for `KEEP_DAYS`, so the
planner can name the bins that overflow again and again, and `binlink report` can build from a real
site the report `binlink sim --report` builds from a simulated one.

One SQLite file (`binlink planner --history FILE`), one row per (bin, measurement): what the state
said (fill, forecast, name, position). Derived from the broker alone: a planner started on a new
machine learns the history from then on; nothing here is needed by a gateway.

Words (planner.py): full is the site's full_pct; an overflow is a reading at or above 100 % (the
bin's full line as registered: the waste is at the lid); an episode lasts from the first such
reading until the bin is emptied (a fall of at least emptied_drop_pct, the gateway's `emptied`)."""
import sqlite3
import threading
import time

from binlink.gateway.planner import parse_iso

DAY = 86400.0
KEEP_DAYS = 120
OVERFLOW_PCT = 100.0


class History:
    def __init__(self, path):
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # derived data: a power cut costs the last readings
        self.db.execute("CREATE TABLE IF NOT EXISTS state (bin_id TEXT NOT NULL, t REAL NOT NULL, fill_pct REAL, full_at REAL,"
                        " rate REAL, name TEXT, lat REAL, lon REAL, PRIMARY KEY (bin_id, t)) WITHOUT ROWID")
        self._pending = []
        self._lock = threading.Lock()  # add() runs in paho's thread, flush() in the planner's
        self._pruned = 0.0

    def add(self, s):
        """A retained state as published (JSON dict). Ignored without a measurement time."""
        try:
            t = parse_iso(s.get("measured_at"))
        except (TypeError, ValueError):
            return
        if t is None:
            return
        full_at = s.get("full_at")
        try:
            full_at = parse_iso(full_at) if isinstance(full_at, str) else None
        except ValueError:
            full_at = None
        row = (str(s["bin_id"]), t, _num(s.get("fill_pct")), full_at, _num(s.get("fill_rate_pct_per_day")),
                              s.get("name") if isinstance(s.get("name"), str) else None, _num(s.get("lat")), _num(s.get("lon")))
        with self._lock:
            self._pending.append(row)

    def take(self):
        """The rows add() collected and flush() has not written, handed over (a simulated
        district's history joins its fleet's with put())."""
        with self._lock:
            rows, self._pending = self._pending, []
        return rows

    def put(self, rows):
        with self._lock:
            self._pending.extend(rows)

    def flush(self, now=None):
        """Writes what add() collected in one transaction; prunes rows older than KEEP_DAYS daily."""
        now = time.time() if now is None else now
        rows = self.take()
        with self.db:
            self.db.execute("BEGIN")
            if rows:
                self.db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            if now - self._pruned > DAY:
                self.db.execute("DELETE FROM state WHERE t < ?", (now - KEEP_DAYS * DAY,))
                self._pruned = now

    def series(self, since=0.0, until=float("inf")):
        """{bin_id: [(t, fill_pct, full_at, rate)]} in time order, and {bin_id: (name, lat, lon)} (the latest)."""
        out, info = {}, {}
        for b, t, fill, full_at, rate, name, lat, lon in self.db.execute(
                "SELECT bin_id, t, fill_pct, full_at, rate, name, lat, lon FROM state WHERE t >= ? AND t <= ? ORDER BY bin_id, t",
                (since, until if until != float("inf") else 1e18)):
            out.setdefault(b, []).append((t, fill, full_at, rate))
            info[b] = (name, lat, lon)
        return out, info

    def close(self):
        self.flush()
        self.db.close()


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None


def episodes(points, emptied_drop_pct=15.0, overflow_pct=OVERFLOW_PCT):
    """From one bin's [(t, fill, ...)]: (pickups, overflows): the times it was emptied, and
    (start, end) of each overflow episode (end: the pickup that ended it, or the last reading)."""
    pickups, overflows = [], []
    prev, start, last_t = None, None, None
    for t, fill, *_ in points:
        if fill is None:
            continue
        if prev is not None and prev - fill >= emptied_drop_pct:
            pickups.append(t)
            if start is not None:
                overflows.append((start, t))
                start = None
        if fill >= overflow_pct and start is None:
            start = t
        prev, last_t = fill, t
    if start is not None:
        overflows.append((start, last_t))
    return pickups, overflows


def hot_spots(history, now, days=28, min_overflows=2, emptied_drop_pct=15.0):
    """Bins that overflowed at least min_overflows times in the last `days`, most first:
    [{"bin_id", "name", "lat", "lon", "overflows", "overflow_h"}]."""
    series, info = history.series(now - days * DAY, now)
    out = []
    for b, points in series.items():
        _, over = episodes(points, emptied_drop_pct)
        if len(over) >= min_overflows:
            name, lat, lon = info[b]
            out.append({"bin_id": b, "name": name, "lat": lat, "lon": lon, "overflows": len(over),
                        "overflow_h": round(sum(e - s for s, e in over) / 3600.0, 1)})
    out.sort(key=lambda h: (-h["overflows"], -h["overflow_h"], h["bin_id"]))
    return out
