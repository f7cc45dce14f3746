"""Frames no counter known here verifies (a gateway that lost track of a bin, a bin whose counter
jumped): kept until the bin's hello names its counter, or two held frames reveal it
(codec.search_counter). A search costs up to 65,536 HMACs, so it is rate-limited per bin and
across bins: forged frames naming many bins cannot eat the CPU."""
from collections import deque

from binlink.wire import codec

HELD_PER_DEVICE = 64  # frames kept per bin until its next hello: a day of reports at the shortest interval
HELD_MAX_AGE_S = 2 * 86400  # the hello comes daily; older frames are not waited for
SEARCH_EVERY_S = 60.0  # a counter search (~0.3 s) at most this often per bin ...
SEARCH_GAP_S = 5.0  # ... and this often across all bins


class Resync:
    def __init__(self):
        self.held = {}  # device_id -> deque of held Uplinks
        self._searched = {}  # device_id -> when its counter was last searched for (None: any bin)

    def __contains__(self, device_id):
        return device_id in self.held

    def hold(self, up, floor):
        """Keeps an uplink; returns the counter of its frame when it and the frames held before it
        reveal it, else None (they wait for the next chance or the bin's hello)."""
        device_id, now = up.device.device_id, up.received_at
        held = self.held.get(device_id)
        if held is None:
            held = self.held[device_id] = deque(maxlen=HELD_PER_DEVICE)
        held.append(up)
        if (len(held) < 2 or codec.explicit_fcnt(up.frame) is not None
                or now - self._searched.get(device_id, -1e9) < SEARCH_EVERY_S
                or now - self._searched.get(None, -1e9) < SEARCH_GAP_S):
            return None
        self._searched[device_id] = self._searched[None] = now
        older = [h.frame for h in list(held)[-2::-1][:4]]
        try:
            return codec.search_counter(up.frame, older, up.device.key, floor)
        except codec.ProtocolError:
            return None

    def release(self, device_id, now):
        """The uplinks held for a bin whose counter is known again, not too old to be worth it."""
        return [up for up in self.held.pop(device_id, ()) if now - up.received_at <= HELD_MAX_AGE_S]
