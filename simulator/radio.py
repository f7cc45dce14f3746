"""The radio channel between simulated bins and the gateway's receivers.

LoRa time on air per spreading factor; loss rising with distance (log-distance path loss with
Gaussian fading against the receiver's sensitivity); collisions when two transmissions on the
same spreading factor overlap at a receiver (the stronger survives by 6 dB: capture effect);
duplicates (the same packet heard twice, e.g. via a repeater); bit errors; half-duplex (a
receiver's radio transmitting during any part of a packet does not hear it). What survives is
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
                 fading_db=6.0, tx_power_dbm=16.15, shadowing_db=0.0):
        """tx_power_dbm: e.i.r.p. of a packet whose sender names none (a gateway's answer, a coverage
        estimate): 25 mW e.r.p., the 865-868 MHz sub-band's limit (ERC Rec 70-03 annex 1), is 14 dBm
        e.r.p. = 16.15 dBm e.i.r.p. A bin's packet carries its module's own power (SimDevice)."""
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
        self.sending = {}  # receiver name -> [(start, end)] of the gateway radio's own transmissions
        self.stats = {"sent": 0, "delivered": 0, "intact": 0, "lost_collision": 0, "lost_half_duplex": 0, "lost_range": 0,
                      "lost_random": 0, "bit_errors": 0, "duplicates": 0}

    def rssi(self, dev_xy, rx, dbm=None):
        return self.level_between(dev_xy, (rx.x, rx.y), dbm)

    def level_between(self, a, b, dbm=None):
        """Mean level at b of a packet sent at a (positions in metres) with e.i.r.p. dbm, before fading."""
        d = max(10.0, math.hypot(a[0] - b[0], a[1] - b[1]))
        power = self.tx_power_dbm if dbm is None else dbm
        return power - 32.0 - 10 * self.path_loss_exp * math.log10(d)  # 32 dB: loss at 1 m, 868 MHz

    def link_level(self, sender, dev_xy, rx, dbm=None):
        """Mean level of one bin at one receiver: distance, the site's extra loss, the link's shadowing."""
        key = (sender, rx.name)
        if key not in self._shadow:
            self._shadow[key] = self.rng.gauss(0.0, self.shadowing_db) if self.shadowing_db else 0.0
        return self.rssi(dev_xy, rx, dbm) - rx.extra_loss_db - self._shadow[key]

    def heard_by(self, sender, dev_xy, sf):
        """Receivers that hear this bin on a typical day (mean level above sensitivity)."""
        return [rx.name for rx in self.receivers if self.link_level(sender, dev_xy, rx) >= SENSITIVITY_DBM[sf]]

    def transmit(self, sender, t, dev_xy, payload, on_air_len, sf, dbm=None):
        """sender's module sends payload at simulated time t (or when its previous packet is out:
        a module sends one packet at a time) at e.i.r.p. dbm. Returns True (the module sent it)."""
        self.pending.append(self.put_on_air(sender, t, dev_xy, payload, on_air_len, sf, dbm))
        return True

    def put_on_air(self, sender, t, dev_xy, payload, on_air_len, sf, dbm=None):
        """The transmission as it goes on air (its start, end, sender, position, payload, power)."""
        toa = lora.time_on_air_s(on_air_len or len(payload), sf)
        start = max(t, self._busy.get(sender, t))
        self._busy[sender] = start + toa + 0.01
        self.stats["sent"] += 1
        return {"t": start, "end": start + toa, "xy": dev_xy, "payload": bytes(payload), "sf": sf, "sender": sender,
                "dbm": self.tx_power_dbm if dbm is None else dbm}

    def gateway_sends(self, rx, start, end):
        """rx's radio transmits from start to end: deaf meanwhile (half-duplex)."""
        self.sending.setdefault(rx.name, []).append((start, end))

    def forget(self, before):
        """Drops the gateway transmissions that ended before `before` (no packet left to overlap them)."""
        for name, spans in self.sending.items():
            self.sending[name] = [s for s in spans if s[1] >= before]

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

    def reception(self, tx, rx, window):
        """What rx makes of tx among the transmissions in window: (outcome, level dBm, payload as
        received); outcome is "intact", "bit_errors", or why it was lost (lost_range,
        lost_half_duplex, lost_collision, lost_random)."""
        r = self.rng
        level = self.link_level(tx["sender"], tx["xy"], rx, tx["dbm"]) + r.gauss(0.0, self.fading_db)
        if level < SENSITIVITY_DBM[tx["sf"]]:
            return "lost_range", level, None
        if any(s < tx["end"] and tx["t"] < e for s, e in self.sending.get(rx.name, ())):
            return "lost_half_duplex", level, None
        rivals = [o for o in window if o is not tx and o["sf"] == tx["sf"] and o["t"] < tx["end"] and tx["t"] < o["end"]]
        if any(self.rssi(o["xy"], rx, o["dbm"]) + CAPTURE_DB > level for o in rivals):
            return "lost_collision", level, None
        if r.random() < self.loss:
            return "lost_random", level, None
        if r.random() < self.bit_errors:
            b = bytearray(tx["payload"])
            b[r.randrange(len(b))] ^= 1 << r.randrange(8)
            return "bit_errors", level, bytes(b)
        return "intact", level, tx["payload"]

    def reaches(self, rx, sender, dev_xy, start, end, sf, window):
        """Does rx's packet from start to end reach the bin `sender` at dev_xy: the link's loss and
        fading (the gateway's module sends at tx_power_dbm, the sub-band's limit), and the bins' packets in window
        overlapping it there, by capture?"""
        level = self.link_level(sender, dev_xy, rx) + self.rng.gauss(0.0, self.fading_db)
        if level < SENSITIVITY_DBM[sf]:
            return False
        return not any(o["sf"] == sf and o["t"] < end and start < o["end"] and o["sender"] != sender
                       and self.level_between(o["xy"], dev_xy, o["dbm"]) + CAPTURE_DB > level for o in window)

    def _deliver(self, tx, window):
        heard = intact = False
        reasons = set()
        for rx in self.receivers:
            outcome, level, payload = self.reception(tx, rx, window)
            if payload is None:
                reasons.add(outcome)
                continue
            if outcome == "intact":
                intact = True
            else:
                reasons.add(outcome)
            copies = 2 if self.rng.random() < self.duplicates else 1
            self.stats["duplicates"] += copies - 1
            snr = round(min(12.0, level - NOISE_FLOOR_DBM), 1)
            for _ in range(copies):
                rx.link.write(encode_for(rx.fmt, payload, int(level), snr))
            heard = True
        self.count(heard, intact, reasons)

    def count(self, heard, intact, reasons):
        """The channel's statistics for one transmission resolved at every receiver."""
        if heard:
            self.stats["delivered"] += 1
        if intact:
            self.stats["intact"] += 1
        else:  # one reason per lost transmission, the one that hit the closest receiver last
            for reason in ("bit_errors", "lost_collision", "lost_half_duplex", "lost_random", "lost_range"):
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
