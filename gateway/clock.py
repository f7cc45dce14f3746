"""Is the system clock plausible? A Pi has no RTC: before NTP it may run years behind, and every
`received_at` it stamps is then wrong. Two things a clock cannot be earlier than:

- this release's date (RELEASED below: raise it with each release, as systemd's TIME_EPOCH);
- the newest `received_at` among the broker's retained bin states stamped by a synced clock (read
  at start by recovery), less a tolerance for gateways whose clocks differ a little. Recovery
  refuses a state later than this clock plus the same tolerance (anyone may retain one from 2099),
  so this catches a clock that steps back while the gateway runs, not one already behind at start.

A clock found implausible is logged once (and once more when it is right again), shown as the
binlink_clock_suspect gauge, and every message says `time_synced: false` meanwhile."""
import logging
import os
from datetime import datetime, timezone

from binlink.gateway import logs

log = logs.get("clock")
RELEASED = datetime(2026, 11, 27, tzinfo=timezone.utc).timestamp()
TOLERANCE_S = 600.0


def clock_synced():
    """True when systemd-timesyncd (or chrony with its flag) says the clock is synchronised."""
    return os.path.exists("/run/systemd/timesync/synchronized")


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
