"""Frames no counter known here verifies (a gateway that lost track of a bin, a bin whose counter
jumped): held until the bin's hello names its counter, or two held frames reveal it.

Anyone can send frames naming any bin, so what is held and what is searched is chosen so that
forged frames cannot crowd out the bin's own (docs/protocol.md, Resynchronisation under forgery):
- each held frame is searched on its own, a slice of high halves at a time, lowest first, the
  least searched frame of the bin first. A genuine frame verifies alone at its counter and becomes
  the bin's anchor: real counters are small (2^24 is 160 years of 5-minute reports), so that takes
  one slice, and a forger's frames can only queue beside it, never ahead. A forged frame goes
  through every high half (65,536 HMACs, spread over slices) and is freed;
- next to an anchor any other frame costs a few tag checks: one that verifies with the counter its
  16 bits name beside the anchor's proves the counter, as two frames always did (a forged frame
  becomes an anchor by chance once in 2^16, a forged pair passes once in 2^48);
- tag checks are paid from one budget for all bins, each bin earning an equal share of it: decoy
  bins cannot take a genuine bin's turns;
- held frames are bounded per bin (the most searched goes first: the least likely to be genuine),
  in total (the oldest goes first) and in age."""
import hmac
import logging
import random
from collections import OrderedDict

from binlink.wire import codec
from binlink.gateway import logs

log = logs.get("pipeline")
WAITING_PER_DEVICE = 32  # frames not placed yet, per bin
ANCHORS_PER_DEVICE = 2  # frames that verified alone, per bin
HELD_TOTAL = 8192  # across bins, however many bins a forger names (~6 MB)
HELD_MAX_AGE_S = 2 * 86400  # the hello comes daily; older frames are not waited for
SLICE = 256  # high halves tried per step: counters below 2^24 in a frame's first step
HMACS_PER_S = 16384  # the budget across bins: ~2 % of an x86 core, ~8 % of a Pi's
HMACS_BURST = 65536  # spent after a quiet spell by frames in quick succession, a whole search's worth
BIN_HMACS_PER_S = 65536 / 60  # one whole search a minute per bin, when few bins ask
# A step for each waiting frame, no more stored: decoys cannot save up turns to spend when a genuine
# bin's frame comes, and one frame's arrival costs the pipeline's thread at most ~10 ms (x86), ~40 ms (Pi)
BIN_HMACS_BURST = WAITING_PER_DEVICE * SLICE


class _Held:
    __slots__ = ("up", "next_epoch")

    def __init__(self, up, first_epoch):
        self.up = up
        self.next_epoch = first_epoch  # the high half the search tries next


class _Bin:
    __slots__ = ("waiting", "anchors", "credit", "earned_at")

    def __init__(self, now):
        self.waiting = []  # _Held not placed yet
        self.anchors = []  # (Uplink, the counter it verified at alone)
        self.credit, self.earned_at = float(SLICE), now  # tag checks this bin may spend now

    def frames(self):
        return [h.up for h in self.waiting] + [up for up, _ in self.anchors]


class Resync:
    def __init__(self, metrics, rng=None):
        self.metrics = metrics
        self.bins = {}  # device_id -> _Bin; kept after its frames go, so that a bin's credit cannot be reset
        self._order = OrderedDict()  # id(Uplink) -> (device_id, Uplink), oldest first: what the caps evict
        self._asking = set()  # device ids with frames waiting: the budget's sharers
        self._tokens, self._refilled = float(HMACS_BURST), None
        self._random = rng or random.Random()

    def __contains__(self, device_id):
        return device_id in self.bins

    def __len__(self):
        """Frames held, all bins."""
        return len(self._order)

    def hold(self, up, floor):
        """Keeps an uplink; returns the newest counter of the bin's held frames once two of them
        prove it, else None (they wait for the bin's next frames or its hello)."""
        found = self._place(up, floor)
        if found is not None:
            self.metrics.resynced.inc()
            logs.event(log, logging.INFO, "counter resynchronised from two frames", device=up.device.dev,
                       fcnt=found, last_fcnt=floor)
        return found

    def release(self, device, anchor, floor, now):
        """The uplinks held for a bin whose counter is known again, in arrival order, not too old,
        each with the counter below the anchor and above the floor that its 16 bits name (one tag
        check: forged ones are dropped, counted when they arrived)."""
        b = self.bins.pop(device.device_id, None)
        if b is None:
            return []
        self._asking.discard(device.device_id)
        placed = []
        for up in sorted(b.frames(), key=lambda up: up.received_at):
            del self._order[id(up)]
            if now - up.received_at > HELD_MAX_AGE_S:
                continue
            try:
                up.fcnt = codec.verify_before(up.frame, device.key, anchor, floor)
            except codec.ProtocolError:
                continue
            placed.append(up)
        return placed

    def _place(self, up, floor):
        if codec.explicit_fcnt(up.frame) is not None:
            return None  # a hello naming its counter verifies alone: this one is forged, not worth holding
        device_id, key, now = up.device.device_id, up.device.key, up.received_at
        b = self.bins.get(device_id)
        if b is None:
            b = self.bins[device_id] = _Bin(now)
        if any(held.frame == up.frame for held in b.frames()):
            return None  # a copy: holding it twice proves nothing more
        self._add(device_id, b, _Held(up, 0 if floor is None else floor >> 16))
        for _, counter in b.anchors:
            if _next_to(up.frame, key, counter, floor) is not None:
                return self._newest(b, key, counter, floor)
        self._earn(b, now)
        while b.waiting and b.credit >= SLICE and self._spend(now):
            b.credit -= SLICE
            held = min(b.waiting, key=lambda h: h.next_epoch)  # the least searched: a genuine frame is never behind
            counter = _search_slice(held, floor)
            if counter is not None:
                found = self._anchor(device_id, b, held, counter, floor)
                if found is not None:
                    return found
            elif held.next_epoch > 0xFFFF:  # no counter verifies it: forged, or damaged on the way
                self._remove(device_id, b, held.up)
        return None

    def _anchor(self, device_id, b, held, counter, floor):
        """A frame verified alone: the counter is proven when another held frame verifies next to
        it (returns the newest counter); else it waits as an anchor for the bin's next frames."""
        b.waiting.remove(held)
        if not b.waiting:
            self._asking.discard(device_id)
        key = held.up.device.key
        if any(_next_to(up.frame, key, counter, floor) is not None for up in b.frames()):
            b.anchors.append((held.up, counter))
            return self._newest(b, key, counter, floor)
        if len(b.anchors) == ANCHORS_PER_DEVICE:  # a forgery's chance match, or the older of two
            self._remove(device_id, b, b.anchors[0][0])
        b.anchors.append((held.up, counter))
        return None

    def _newest(self, b, key, counter, floor):
        """A proven counter → the newest counter among the bin's held frames next to it, so that
        release() places every one of them below it."""
        return max((c for up in b.frames() if (c := _next_to(up.frame, key, counter, floor)) is not None), default=counter)

    def _earn(self, b, now):
        """A bin's share of the budget since it last asked: the budget split over the bins asking,
        at most its own rate."""
        share = min(BIN_HMACS_PER_S, HMACS_PER_S / max(1, len(self._asking)))
        b.credit = min(BIN_HMACS_BURST, b.credit + max(0.0, now - b.earned_at) * share)
        b.earned_at = now

    def _spend(self, now):
        if self._refilled is not None:
            self._tokens = min(HMACS_BURST, self._tokens + max(0.0, now - self._refilled) * HMACS_PER_S)
        self._refilled = now
        if self._tokens < SLICE:
            return False
        self._tokens -= SLICE
        return True

    def _add(self, device_id, b, held):
        if len(b.waiting) == WAITING_PER_DEVICE:  # the most searched goes: the least likely to be genuine
            deepest = max(h.next_epoch for h in b.waiting)
            self._remove(device_id, b, self._random.choice([h for h in b.waiting if h.next_epoch == deepest]).up)
        b.waiting.append(held)
        self._order[id(held.up)] = (device_id, held.up)
        self._asking.add(device_id)
        while True:
            oldest_device, oldest = next(iter(self._order.values()))
            if len(self._order) <= HELD_TOTAL and held.up.received_at - oldest.received_at <= HELD_MAX_AGE_S:
                return
            self._remove(oldest_device, self.bins[oldest_device], oldest)

    def _remove(self, device_id, b, up):
        del self._order[id(up)]
        b.waiting = [h for h in b.waiting if h.up is not up]
        b.anchors = [a for a in b.anchors if a[0] is not up]
        if not b.waiting:
            self._asking.discard(device_id)


def _search_slice(held, floor):
    """The next SLICE high halves of a held frame's counter: the first above floor at which its tag
    verifies alone, else None (held.next_epoch moves on)."""
    frame, key = held.up.frame, held.up.device.key
    low, body, got = codec.parse_header(frame)[2], frame[:-codec.TAG_LEN], frame[-codec.TAG_LEN:]
    start, held.next_epoch = held.next_epoch, min(0x10000, held.next_epoch + SLICE)
    for epoch in range(start, held.next_epoch):
        counter = epoch << 16 | low
        if (floor is None or counter > floor) and hmac.compare_digest(codec.tag(key, counter, body), got):
            return counter
    return None


def _next_to(frame, key, counter, floor):
    """The newer of `counter` and the frame's own counter when the frame verifies beside it: after
    it (within the gap limit) or before it (above floor); else None. Three tag checks at most."""
    try:
        return codec.verify(frame, key, counter)
    except codec.ProtocolError:
        pass
    try:
        codec.verify_before(frame, key, counter, floor)
        return counter
    except codec.ProtocolError:
        return None
