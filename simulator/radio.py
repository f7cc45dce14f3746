"""The radio channel between simulated bins and the gateway's receivers.

LoRa time on air per spreading factor; loss rising with distance (log-distance path loss with
Gaussian fading against the receiver's sensitivity); collisions when two transmissions on the
same spreading factor overlap at a receiver (the stronger survives by 6 dB: capture effect);
duplicates (the same packet heard twice, e.g. via a repeater); bit errors. What survives is
written to each receiver's pseudo-terminal in its module format."""
import math

from binlink.sim.parts import lora
from binlink.gateway.module_formats import rylr998_line

SENSITIVITY_DBM = {7: -123, 8: -126, 9: -129, 10: -132, 11: -134.5, 12: -137}  # SX1262, 125 kHz
NOISE_FLOOR_DBM = -117.0  # 125 kHz: -174 + 10 log10(125e3) + 6 dB noise figure
CAPTURE_DB = 6.0


class Receiver:
    """A gateway radio at (x, y) metres whose module writes to `link` in `fmt`; extra_loss_db: what
    its site adds on every link (antenna low, behind a building)."""

    def __init__(self, name, link, fmt, x=0.0, y=0.0, extra_loss_db=0.0):
        self.name = name
        self.link = link
        self.fmt = fmt
        self.x = x
        self.y = y
        self.extra_loss_db = extra_loss_db


class Channel:
    def __init__(self, rng, receivers, loss=0.01, duplicates=0.01, bit_errors=0.002, path_loss_exp=2.9,
                 fading_db=6.0, tx_power_dbm=22.0, shadowing_db=0.0):
        self.rng = rng
        self.receivers = receivers
        self.loss = loss  # base loss rate, independent of distance (interference, shadowing)
        self.duplicates = duplicates
        self.bit_errors = bit_errors
        self.path_loss_exp = path_loss_exp
        self.fading_db = fading_db
        self.tx_power_dbm = tx_power_dbm
        self.shadowing_db = shadowing_db  # per link, fixed: the buildings between one bin and one gateway
        self._shadow = {}  # (sender, receiver name) -> dB
        self.pending = []  # transmissions not yet delivered (a later one may still collide)
        self._busy = {}  # sender -> time its module is free again
        self.stats = {"sent": 0, "delivered": 0, "intact": 0, "lost_collision": 0, "lost_range": 0, "lost_random": 0,
                      "bit_errors": 0, "duplicates": 0}

    def rssi(self, dev_xy, rx):
        d = max(10.0, math.hypot(dev_xy[0] - rx.x, dev_xy[1] - rx.y))
        return self.tx_power_dbm - 32.0 - 10 * self.path_loss_exp * math.log10(d)  # 32 dB: loss at 1 m, 868 MHz

    def link_level(self, sender, dev_xy, rx):
        """Mean level of one bin at one receiver: distance, the site's extra loss, the link's shadowing."""
        key = (sender, rx.name)
        if key not in self._shadow:
            self._shadow[key] = self.rng.gauss(0.0, self.shadowing_db) if self.shadowing_db else 0.0
        return self.rssi(dev_xy, rx) - rx.extra_loss_db - self._shadow[key]

    def heard_by(self, sender, dev_xy, sf):
        """Receivers that hear this bin on a typical day (mean level above sensitivity)."""
        return [rx.name for rx in self.receivers if self.link_level(sender, dev_xy, rx) >= SENSITIVITY_DBM[sf]]

    def transmit(self, sender, t, dev_xy, payload, on_air_len, sf):
        """sender's module sends payload at simulated time t (or when its previous packet is out:
        a module sends one packet at a time). Returns True (the module sent it)."""
        toa = lora.time_on_air_s(on_air_len or len(payload), sf)
        start = max(t, self._busy.get(sender, t))
        self._busy[sender] = start + toa + 0.01
        self.pending.append({"t": start, "end": start + toa, "xy": dev_xy, "payload": bytes(payload), "sf": sf, "sender": sender})
        self.stats["sent"] += 1
        return True

    def flush(self, now, force=False):
        """Delivers every transmission that ended long enough before now to know its collisions."""
        keep, done = [], []
        for tx in self.pending:
            (done if force or tx["end"] + 3.0 < now else keep).append(tx)
        if not done:
            return 0
        window = done + keep
        for tx in done:
            self._deliver(tx, window)
        self.pending = keep
        return len(done)

    def _deliver(self, tx, window):
        r = self.rng
        heard = intact = False
        reasons = set()
        for rx in self.receivers:
            level = self.link_level(tx["sender"], tx["xy"], rx) + r.gauss(0.0, self.fading_db)
            if level < SENSITIVITY_DBM[tx["sf"]]:
                reasons.add("lost_range")
                continue
            rivals = [o for o in window if o is not tx and o["sf"] == tx["sf"] and o["t"] < tx["end"] and tx["t"] < o["end"]]
            if any(self.rssi(o["xy"], rx) + CAPTURE_DB > level for o in rivals):
                reasons.add("lost_collision")
                continue
            if r.random() < self.loss:
                reasons.add("lost_random")
                continue
            payload = tx["payload"]
            if r.random() < self.bit_errors:
                b = bytearray(payload)
                b[r.randrange(len(b))] ^= 1 << r.randrange(8)
                payload = bytes(b)
                reasons.add("bit_errors")
            else:
                intact = True
            copies = 2 if r.random() < self.duplicates else 1
            self.stats["duplicates"] += copies - 1
            snr = round(min(12.0, level - NOISE_FLOOR_DBM), 1)
            for _ in range(copies):
                rx.link.write(encode_for(rx.fmt, payload, int(level), snr))
            heard = True
        if heard:
            self.stats["delivered"] += 1
        if intact:
            self.stats["intact"] += 1
        else:  # one reason per lost transmission, the one that hit the closest receiver last
            for reason in ("bit_errors", "lost_collision", "lost_random", "lost_range"):
                if reason in reasons:
                    self.stats[reason] += 1
                    break

    @property
    def lost(self):
        """Transmissions no receiver got intact (lost, collided or corrupted), delivered ones only."""
        return self.stats["sent"] - self.stats["intact"] - len(self.pending)


def encode_for(fmt, payload, rssi, snr):
    """What the receiving module prints on its UART for a received packet."""
    if fmt == "raw":
        return payload
    if fmt == "raw+rssi":
        return payload + bytes([max(1, min(255, 256 + rssi))])
    if fmt == "rylr998":
        return rylr998_line(payload, addr=0, rssi=rssi, snr=snr)
    raise ValueError("unknown module format %r" % fmt)
