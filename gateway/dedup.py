"""Deduplication: the same frame heard again, by one radio (a repeat) or several, within a window.

The counter check already refuses any frame not newer than the last accepted one; this stage
tells a *duplicate* (the identical bytes of a frame accepted moments ago) from a *replay*."""
import hashlib
from collections import deque


def digest(frame):
    """8 bytes that tell two frames with the same counter apart (shared with other gateways)."""
    return hashlib.blake2s(frame, digest_size=8).digest()


class Dedup:
    """Kept compact (an int key, the frame, the time once per group): at 20 times a serial line's
    rate, a 30 s window holds hundreds of thousands of frames. The frame itself, not a digest of
    it: it is in memory anyway (a reading's 16 bytes cost what an 8-byte digest object does), and
    comparing it is exact and costs no hashing."""

    def __init__(self, window_s):
        self.window_s = window_s
        self._seen = {}  # device_id << 32 | fcnt -> frame
        self._copies = {}  # the same key -> times heard again: forgotten with the frame
        self._groups = deque()  # (first seen at, [keys]) oldest first: what expire() drops

    def remember(self, device_id, fcnt, frame, now):
        self.expire(now)  # a key past its window starts a new one
        key = device_id << 32 | fcnt
        if key not in self._seen:
            if self._groups and self._groups[-1][0] == now:
                self._groups[-1][1].append(key)
            else:
                self._groups.append((now, [key]))
        elif self._seen[key] != frame:  # another frame at this counter (a new key's): its copies count anew
            self._copies.pop(key, None)
        self._seen[key] = frame

    def is_duplicate(self, device_id, fcnt, frame, now):
        self.expire(now)
        return self._seen.get(device_id << 32 | fcnt) == frame

    def heard_again(self, device_id, fcnt):
        """A remembered frame heard once more: how many times so far (call remember() first)."""
        key = device_id << 32 | fcnt
        copies = self._copies[key] = self._copies.get(key, 0) + 1
        return copies

    def expire(self, now):
        groups, seen, copies = self._groups, self._seen, self._copies
        while groups and now - groups[0][0] > self.window_s:
            for key in groups.popleft()[1]:
                seen.pop(key, None)
                copies.pop(key, None)
