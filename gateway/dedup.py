"""Deduplication: the same frame heard again, by one radio (a repeat) or several, within a window.

The counter check already refuses any frame not newer than the last accepted one; this stage
tells a *duplicate* (the identical bytes of a frame accepted moments ago) from a *replay*."""
import hashlib
from collections import OrderedDict


def digest(frame):
    """8 bytes that tell two frames with the same counter apart (shared with other gateways)."""
    return hashlib.blake2s(frame, digest_size=8).digest()


class Dedup:
    def __init__(self, window_s):
        self.window_s = window_s
        self._seen = OrderedDict()  # (device_id, fcnt) -> (frame digest, first seen at), oldest first

    def remember(self, device_id, fcnt, frame, now):
        self._seen[(device_id, fcnt)] = (digest(frame), now)

    def is_duplicate(self, device_id, fcnt, frame, now):
        hit = self._seen.get((device_id, fcnt))
        return hit is not None and now - hit[1] <= self.window_s and hit[0] == digest(frame)

    def expire(self, now):
        seen = self._seen
        while seen:
            key, (_, t) = next(iter(seen.items()))
            if now - t <= self.window_s:
                break
            del seen[key]
