"""Freed memory back to the system after a burst: a Pi's RAM is shared with everything else, and
glibc keeps what a burst's queues, batches and messages freed for the process unless asked."""
import ctypes
import ctypes.util

TRIM_AFTER = 10000  # frames (service) or messages (publisher) since the last trim


def _libc_malloc_trim():
    """glibc's malloc_trim, or None (musl and others: nothing to do)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _libc_malloc_trim()


class Trimmer:
    """Counts work done; give_back() trims once TRIM_AFTER has been done since the last time.
    Call it when the burst is over (nothing queued), not in the middle of one."""

    def __init__(self):
        self.since = 0

    def count(self, n):
        self.since += n

    def give_back(self):
        if self.since >= TRIM_AFTER and _malloc_trim is not None:
            _malloc_trim(0)
            self.since = 0
