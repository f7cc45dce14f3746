"""Is the system clock plausible? A Pi has no RTC: before NTP it may run years behind, and every
`received_at` it stamps is then wrong. Two things a clock cannot be earlier than:

- this release's date (RELEASED below: raise it with each release, as systemd's TIME_EPOCH);
- the newest `received_at` among the broker's retained bin states stamped by a synced clock (read
  at start by recovery), less a tolerance for gateways whose clocks differ a little. Recovery
  refuses a state later than this clock plus the same tolerance (anyone may retain one from 2099),
  so this catches a clock that steps back while the gateway runs, not one already behind at start.

A clock found implausible is logged once (and once more when it is right again), shown as the
binlink_clock_suspect gauge, and every message says `time_synced: false` meanwhile."""
import ctypes
import ctypes.util
import logging
from datetime import datetime, timezone

from binlink.gateway import logs

log = logs.get("clock")
RELEASED = datetime(2026, 11, 27, tzinfo=timezone.utc).timestamp()
TOLERANCE_S = 600.0

# The kernel's own answer (adjtimex(2), modes 0: read only), which every NTP client keeps up to
# date: chrony, systemd-timesyncd, ntpd, ntpsec. STA_UNSYNC set, or a maximum error of 16 s or more
# (the kernel raises maxerror by 500 ppm while nobody disciplines the clock, and sets STA_UNSYNC
# past 16 s), or the TIME_ERROR state: not synchronised. The same test as systemd's
# `timedatectl` ("System clock synchronized").
STA_UNSYNC = 0x0040
TIME_ERROR = 5
MAXERROR_LIMIT_US = 16_000_000


class _Timex(ctypes.Structure):
    """struct timex (linux/timex.h): the fields read here, then room for the rest."""
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
                ("rest", ctypes.c_byte * 256)]


def _libc_adjtimex():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return getattr(libc, "ntp_adjtime", None) or libc.adjtimex
    except (OSError, AttributeError):
        return None  # not Linux/glibc: nothing to ask


_adjtimex = _libc_adjtimex()


def kernel_clock():
    """(adjtimex's return value: the clock state, status bits, maxerror in µs), or None when the
    kernel cannot be asked."""
    if _adjtimex is None:
        return None
    tx = _Timex()
    state = _adjtimex(ctypes.byref(tx))
    if state < 0:
        return None
    return state, tx.status, tx.maxerror


def synced(answer):
    """Whether the kernel's answer (kernel_clock()) says the clock is synchronised."""
    if answer is None:
        return False
    state, status, maxerror = answer
    return state != TIME_ERROR and not status & STA_UNSYNC and 0 <= maxerror < MAXERROR_LIMIT_US


def clock_synced():
    """True when the kernel says an NTP client (chrony, systemd-timesyncd, ntpd) synchronised the clock."""
    return synced(kernel_clock())


class ClockCheck:
    def __init__(self, metrics, not_before=RELEASED):
        self.metrics = metrics
        self.not_before = not_before
        self.broker_time = None  # newest synced received_at seen on the broker, or None
        self.suspect = None  # unknown until the first check

    def problem(self, now):
        """Why the clock cannot be right at `now`, or None."""
        if now < self.not_before:
            return "before this release (%s)" % datetime.fromtimestamp(self.not_before, timezone.utc).date()
        if self.broker_time is not None and now < self.broker_time - TOLERANCE_S:
            return "%.0f s behind the newest synced state on the broker" % (self.broker_time - now)
        return None

    def plausible(self, now):
        why = self.problem(now)
        suspect = why is not None
        if suspect != self.suspect:
            self.metrics.clock_suspect.set(int(suspect))
            if suspect:
                logs.event(log, logging.ERROR, "system clock cannot be right: messages say time_synced=false",
                           clock=datetime.fromtimestamp(now, timezone.utc).isoformat(), reason=why)
            elif self.suspect:
                logs.event(log, logging.WARNING, "system clock plausible again",
                           clock=datetime.fromtimestamp(now, timezone.utc).isoformat())
            self.suspect = suspect
        return not suspect
