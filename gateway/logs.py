"""Structured logs: one logfmt line per event (`level=info event=rejected reason=bad_tag ...`).

systemd's journal stores stdout lines as they are; logfmt stays readable there and greppable by
key. Never pass a device key to a log call."""
import logging
import sys


class LogfmtFormatter(logging.Formatter):
    def format(self, record):
        parts = ["level=%s" % record.levelname.lower(), "logger=%s" % record.name, "msg=%s" % _quote(record.getMessage())]
        for k, v in getattr(record, "fields", {}).items():
            parts.append("%s=%s" % (k, _quote(v)))
        if record.exc_info:
            parts.append("exc=%s" % _quote(self.formatException(record.exc_info)))
        return " ".join(parts)


def _quote(v):
    s = str(v)
    if not s or any(c in s for c in ' "=\n\t'):
        return '"%s"' % s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return s


def setup(level="info"):
    root = logging.getLogger("binlink")
    root.setLevel(level.upper())
    if not root.handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(LogfmtFormatter())
        root.addHandler(h)
    root.propagate = False
    return root


def get(name):
    return logging.getLogger("binlink." + name)


def event(logger, level, msg, **fields):
    logger.log(level, msg, extra={"fields": fields})


class RateLimit:
    """At most per_minute log lines per key; a noisy radio must not fill a Pi's SD card with
    journal lines. The counters (metrics) still count every event; the first line after a quiet
    spell says how many were left out."""

    def __init__(self, per_minute):
        self.per_minute = per_minute
        self._windows = {}  # key -> [window start, lines logged, lines suppressed]

    def allow(self, key, now):
        w = self._windows.get(key)
        if w is None or now - w[0] >= 60:
            suppressed = w[2] if w else 0
            self._windows[key] = [now, 1, 0]
            if suppressed:
                logging.getLogger("binlink.logs").warning(
                    "suppressed lines", extra={"fields": {"key": key, "suppressed": suppressed}})
            return True
        if w[1] < self.per_minute:
            w[1] += 1
            return True
        w[2] += 1
        return False
