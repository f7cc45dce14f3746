"""When will each bin be full? A per-bin forecast in the spirit of the IPSO/LwM2M filling-level
object 3435 (resources "average fill speed" and "forecast full date").

Model, learned from the bin's own readings only:

  fill rate at time t = base (% per hour) x day[hour of day] x week[day of week]

`base` is the exponentially weighted rise (time constant a week) over the exponentially weighted
rise the multipliers predicted (a ratio of sums: a ratio per interval would be biased up by
noise). `day` (24) and `week` (7) are multipliers with mean 1: an hour-of-day multiplier learns
from each interval's rise, a day-of-week one from a whole day's (sums over a day cancel the sensor
noise single hours cannot), so a park bin learns that it fills in the afternoon and at weekends.
Readings at the top (SATURATED_PCT) teach no rate: an overfull bin cannot read fuller. The level
is smoothed (predict with the model, then move part of the way to the reading, the innovation
clipped so one stray echo cannot move it far). A fall of more than `pickup_drop_pct` below the
level is a pickup: the level restarts there and the rates are kept (a bin's habits survive
emptying). A gap longer than MAX_GAP_H teaches nothing about rates; the level restarts at the
next reading. Times are UTC: a site far from it sees its daily rhythm shifted, which the hourly
multipliers learn all the same.

Constant memory (a few dozen floats a bin) and bounded work per reading: learning walks the
hours between two readings (at most MAX_GAP_H), predicting walks at most HORIZON_DAYS days."""
import math
import sqlite3
import struct
import time

HOUR = 3600.0
DAY = 86400.0
SATURATED_PCT = 98.0  # at the top the reading cannot rise any more: such intervals teach no rate
MAX_GAP_H = 48.0  # longer silences: the level restarts, no rate is learned
HORIZON_DAYS = 14  # full_at further away than this is "not predictable" (null)
MIN_LEARNED_H = 12.0  # hours of readings before a forecast is published
PRIOR_RATE = 1.0  # % per hour before anything is learned (about four days to fill)
BASE_TAU_H = 168.0  # time constant of the mean rate: a week, so the weekly rhythm is not mistaken for a change
PRIOR_WEIGHT_H = 2.0  # the prior rate counts as two hours of history: forgotten at once
# hour-of-day multipliers start as running means (gain 1/n) and settle to exponential weights (an
# hour is seen once a day: ~ten days of memory); a day-of-week multiplier learns once a week from
# the whole day's rise, likewise a running mean for three weeks, then ~three weeks of memory
DAY_GAIN = 0.1
WEEK_GAIN = 0.3
WEEK_AFTER_H = 72.0  # the first days' hourly shape and mean rate are too rough to judge a weekday by
MIN_DAY_HOURS = 16.0  # a day seen for fewer hours (pickups, saturation, silence) teaches no weekly rhythm
LEVEL_GAIN = 0.5
INNOVATION_CLIP = 6.0  # % a single reading may move the level by (beyond the model's prediction)
SHAPE_MIN, SHAPE_MAX = 0.05, 6.0  # a multiplier never reaches 0: it divides
_STALE = object()  # a cached result to be computed again


# The per-reading code writes min() and max() out as comparisons: on CPython 3.11 a builtin call
# costs ~0.1 µs, a comparison a tenth of that. Each is written to return what the builtin returns,
# for NaN too (the first argument unless the second compares smaller, or greater).
def _clip(x, lo, hi):
    """max(lo, min(hi, x)) for lo < hi (NaN: hi)."""
    return lo if x < lo else x if x < hi else hi


def _hour_and_weekday(t):
    """Hour-of-day bucket and day-of-week (0 = Monday) of a UTC timestamp (1970-01-01 was a Thursday)."""
    hours = int(t // HOUR)
    return hours % 24, (hours // 24 + 3) % 7


class BinForecast:
    """One bin's state. Use update() for each reading in measurement order, then full_at()."""

    __slots__ = ("t", "level", "raw", "rise_sum", "shape_sum", "learned_h", "day_no", "day_rise", "day_expect",
                 "day_hours", "day", "week", "_rate", "_full")
    _FMT = "<10d24d7d"  # 328 bytes a bin

    def __init__(self):
        self.t = None  # time of the last reading
        self.level = None  # smoothed fill %
        self.raw = None  # the last reading as measured
        self.rise_sum = PRIOR_RATE * PRIOR_WEIGHT_H  # % risen, exponentially weighted
        self.shape_sum = PRIOR_WEIGHT_H  # shape-hours it rose over, likewise
        self.learned_h = 0.0
        # the calendar day being observed, for the day-of-week multipliers: its rise and the rise
        # the model expected without the weekly multiplier, and the hours observed
        self.day_no, self.day_rise, self.day_expect, self.day_hours = -1.0, 0.0, 0.0, 0.0
        self.day = [1.0] * 24
        self.week = [1.0] * 7
        # rate_pct_per_day() and full_at() as of the last change, reset by update(), never persisted:
        # the gateway asks for both after every reading, and a repeated or faulty one changes nothing
        self._rate = _STALE
        self._full = None  # (full_pct, full_at)

    # persistence ---------------------------------------------------------------------------------
    def to_bytes(self):
        head = (-1.0 if self.t is None else self.t, -1.0 if self.level is None else self.level,
                -1.0 if self.raw is None else self.raw, self.rise_sum, self.shape_sum, self.learned_h,
                self.day_no, self.day_rise, self.day_expect, self.day_hours)
        return struct.pack(self._FMT, *head, *self.day, *self.week)

    @classmethod
    def from_bytes(cls, blob):
        v = struct.unpack(cls._FMT, blob)
        f = cls()
        f.t = None if v[0] < 0 else v[0]
        f.level = None if v[1] < 0 else v[1]
        f.raw = None if v[2] < 0 else v[2]
        f.rise_sum, f.shape_sum, f.learned_h, f.day_no, f.day_rise, f.day_expect, f.day_hours = v[3:10]
        f.day, f.week = list(v[10:34]), list(v[34:41])
        return f

    # the model ---------------------------------------------------------------------------------
    @property
    def base(self):
        """Mean rate, % per shape-hour (per hour on average: the multipliers have mean 1)."""
        rate = self.rise_sum / self.shape_sum if self.shape_sum > 0 else 0.0
        return rate if rate > 0.0 else 0.0

    def shape_hours(self, t0, t1):
        """Integrals of the multipliers over [t0, t1], in hours (the expected rise / base): with
        the day-of-week multiplier, and without it."""
        total = plain = 0.0
        t = t0
        while t < t1:
            hour, weekday = _hour_and_weekday(t)
            end = (t // HOUR + 1) * HOUR
            end = end if end < t1 else t1
            part = (end - t) / HOUR * self.day[hour]
            plain += part
            total += part * self.week[weekday]
            t = end
        return total, plain

    def update(self, t, fill, pickup_drop_pct=15.0):
        """Learns from one reading (fill % or None for a faulty one). Returns True when it was a pickup."""
        last = self.t
        if fill is None or (last is not None and t <= last):
            return False
        self._rate, self._full = _STALE, None
        if last is None or t - last > MAX_GAP_H * HOUR:
            self.t, self.level, self.raw = t, fill, fill
            return False
        if fill < self.level - pickup_drop_pct:
            self.t, self.level, self.raw = t, fill, fill
            return True
        dt_h = (t - last) / HOUR
        shape, shape_without_week = self.shape_hours(last, t)
        base = self.base
        expected = base * shape
        # robust: a stray echo or a bag dropped right under the sensor moves nothing far
        raw = self.raw
        rise, top = fill - raw, expected + INNOVATION_CLIP
        rise = -INNOVATION_CLIP if rise < -INNOVATION_CLIP else top if rise > top else rise  # min(max(rise, -clip), top)
        if shape > 0 and (raw if raw > fill else fill) < SATURATED_PCT:  # at the top a rise cannot be seen
            self._learn_week(t, rise, base * shape_without_week, dt_h)
            keep = math.exp(-dt_h / BASE_TAU_H)
            self.rise_sum = self.rise_sum * keep + rise
            self.shape_sum = self.shape_sum * keep + shape
            base = self.base
            if base > 0 and dt_h <= 6.0:
                # the hour-of-day multiplier of the interval's middle; noise is zero-mean, so q may
                # be negative: only the learned multiplier is bounded
                hour, weekday = _hour_and_weekday((last + t) / 2)
                seen_days = self.learned_h / 24.0  # observations per bucket so far, about
                q = rise / (base * dt_h * self.week[weekday])
                gain = 1.0 / (2.0 + seen_days)
                self._learn(self.day, hour, q, gain if gain > DAY_GAIN else DAY_GAIN)
        predicted = self.level + expected
        level = predicted + LEVEL_GAIN * _clip(fill - predicted, -INNOVATION_CLIP, INNOVATION_CLIP)
        self.level = level if level > 0.0 else 0.0
        self.t, self.raw = t, fill
        self.learned_h += dt_h
        return False

    def _learn_week(self, t, rise, expect_without_week, dt_h):
        """Day-of-week multipliers from whole days: a day's rise over what its hours predicted.
        Sums over a day cancel most sensor noise, which single hours cannot."""
        day_no = (self.t + t) / 2 // DAY
        if day_no != self.day_no:
            if self.day_hours >= MIN_DAY_HOURS and self.day_expect > 0 and self.learned_h >= WEEK_AFTER_H:
                weekday = int(self.day_no + 3) % 7
                weeks_seen = int(self.learned_h // (7 * 24))  # this weekday's observations before, about
                self._learn(self.week, weekday, self.day_rise / self.day_expect, max(WEEK_GAIN, 1.0 / (1.0 + weeks_seen)))
            self.day_no, self.day_rise, self.day_expect, self.day_hours = day_no, 0.0, 0.0, 0.0
        self.day_rise += rise
        self.day_expect += expect_without_week
        self.day_hours += dt_h

    @staticmethod
    def _learn(shape, i, q, gain):
        q = _clip(q, -SHAPE_MAX, SHAPE_MAX)
        shape[i] = _clip(shape[i] + gain * (q - shape[i]), SHAPE_MIN, SHAPE_MAX)
        mean = sum(shape) / len(shape)
        if mean > 0:
            shape[:] = [v / mean for v in shape]

    def rate_pct_per_day(self):
        """Average fill speed (% per day): the learned mean rate."""
        if self._rate is _STALE:
            self._rate = None if self.learned_h < MIN_LEARNED_H else round(self.base * 24.0, 2)
        return self._rate

    def full_at(self, full_pct=100.0):
        """Predicted time (UTC seconds) the bin reaches full_pct, None when not predictable."""
        cached = self._full
        if cached is None or cached[0] != full_pct:
            cached = self._full = (full_pct, self._predict_full(full_pct))
        return cached[1]

    def _predict_full(self, full_pct):
        if self.t is None or self.learned_h < MIN_LEARNED_H:
            return None
        if self.level >= full_pct:
            return self.t
        base = self.base
        if base <= 1e-6:
            return None
        need = (full_pct - self.level) / base  # in shape-hours
        day, week = self.day, self.week
        hour, weekday = _hour_and_weekday(self.t)
        t = (self.t // HOUR + 1) * HOUR  # the end of the current hour
        rate = day[hour] * week[weekday]
        gain = (t - self.t) / HOUR * rate
        if gain >= need:
            return self.t + need / rate * HOUR
        need -= gain
        # hour by hour to midnight, a whole day at once while it is not enough, then hour by hour
        # again: at most ~60 steps. `need` is reduced by the same products in the same order as a
        # plain hour-by-hour walk, so the result is that walk's to the bit
        w = week[weekday]
        for d in day[hour + 1:]:  # the rest of today: far inside the horizon
            rate = d * w
            if rate >= need:
                return t + need / rate * HOUR
            need -= rate
            t += HOUR
        end = self.t + HORIZON_DAYS * DAY
        day_sum = sum(day)
        while t < end:  # t is a midnight
            weekday = (weekday + 1) % 7
            w = week[weekday]
            if day_sum * w < need:
                need -= day_sum * w
                t += DAY
                continue
            # the hours of the horizon's last day that start before it ends (t + h * HOUR: whole
            # seconds, exact, the t an hour-by-hour walk would reach)
            hours = day if t + 23 * HOUR < end else [d for h, d in enumerate(day) if t + h * HOUR < end]
            for d in hours:
                rate = d * w
                if rate >= need:
                    at = t + need / rate * HOUR
                    return at if at <= end else None  # the last hour may reach past the horizon
                need -= rate
                t += HOUR
        return None


SAVE_EVERY_S = 300.0  # forecasts are derived data: a power cut costs at most this much learning


class ForecastStore:
    """Every bin's forecast, kept in SQLite in the gateway's state folder, so a restart forgets
    (almost) nothing. Saved every SAVE_EVERY_S, not with each group commit: at a site's few frames
    a minute, a transaction per reading would double what the SD card is written."""

    def __init__(self, path, pickup_drop_pct=15.0, full_pct=100.0):
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        # derived data: no fsync per commit (WAL + NORMAL); a power cut costs a few readings' learning,
        # never the outbox's durability, and the group commit's latency stays the outbox's own
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS forecast (bin_id TEXT PRIMARY KEY, state BLOB NOT NULL)")
        # beside it, for Home Assistant's sw_version: the firmware each device said it runs
        self.db.execute("CREATE TABLE IF NOT EXISTS firmware (device TEXT PRIMARY KEY, version TEXT NOT NULL)")
        self.pickup_drop_pct = pickup_drop_pct
        self.full_pct = full_pct  # the site's events.full_pct: full_at is when the bin reaches it
        self.bins = {bin_id: BinForecast.from_bytes(blob) for bin_id, blob in self.db.execute("SELECT bin_id, state FROM forecast")}
        self._dirty = set()
        self._saved_at = time.monotonic()

    def update(self, bin_id, t, fill):
        """Learns one reading; returns (fill_rate_pct_per_day, full_at seconds or None)."""
        f = self.bins.get(bin_id)
        if f is None:
            f = self.bins[bin_id] = BinForecast()
        f.update(t, fill, self.pickup_drop_pct)
        self._dirty.add(bin_id)
        return f.rate_pct_per_day(), f.full_at(self.full_pct)

    def save(self, force=False):
        """One transaction for the bins updated since the last save, when SAVE_EVERY_S has passed
        (or force); False when it could not be written (they stay to be saved later)."""
        if not self._dirty or not (force or time.monotonic() - self._saved_at >= SAVE_EVERY_S):
            return True
        rows = [(b, self.bins[b].to_bytes()) for b in self._dirty]
        try:
            with self.db:
                self.db.execute("BEGIN")
                self.db.executemany("INSERT OR REPLACE INTO forecast (bin_id, state) VALUES (?, ?)", rows)
        except sqlite3.Error:  # a full disk: derived data, kept in memory and saved with a later group
            return False
        self._dirty.clear()
        self._saved_at = time.monotonic()
        return True

    def firmware(self):
        return dict(self.db.execute("SELECT device, version FROM firmware"))

    def set_firmware(self, device, version):
        try:
            self.db.execute("INSERT OR REPLACE INTO firmware (device, version) VALUES (?, ?)", (device, version))
        except sqlite3.Error:
            pass  # a full disk: the next hello brings the version again

    def close(self):
        self.save(force=True)
        self.db.close()
