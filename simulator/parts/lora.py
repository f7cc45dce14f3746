"""LoRa time on air as the radio chip's datasheet gives it, for the part models and the channel.

Semtech SX1276/77/78/79 datasheet rev. 7, section 4.1.1.7 "Time on air" (the SX1262 inside the
E22-900T22 and the RYLR998's chip follow the same formula, SX1261/2 datasheet section 6.1.4):

    Tsym = 2^SF / BW
    Tpreamble = (Npreamble + 4.25) * Tsym
    payloadSymbNb = 8 + max(ceil((8 PL - 4 SF + 28 + 16 CRC - 20 IH) / (4 (SF - 2 DE))) * (CR + 4), 0)
    Tpacket = Tpreamble + payloadSymbNb * Tsym

with DE (low data rate optimisation) on whenever a symbol lasts more than 16 ms (section 4.1.1.6),
CR 1..4 for coding rate 4/5..4/8. Written here from the datasheet, not taken from the firmware's
`binlink.wire.airtime`: the world the firmware is tested against must not share its arithmetic
(tests/test_parts.py compares the two)."""
import math


def symbol_s(sf, bw_hz):
    return (2 ** sf) / bw_hz


def time_on_air_s(payload_len, sf, bw_hz=125000, preamble=8, cr=1, crc=True, implicit_header=False):
    t_sym = symbol_s(sf, bw_hz)
    de = 1 if t_sym > 0.016 else 0
    bits = 8 * payload_len - 4 * sf + 28 + (16 if crc else 0) - (20 if implicit_header else 0)
    payload_symbols = 8 + max(math.ceil(bits / (4 * (sf - 2 * de))) * (cr + 4), 0)
    return (preamble + 4.25) * t_sym + payload_symbols * t_sym


def next_air_event(t, incoming, tx_until, now):
    """The earliest of t (None: nothing yet), a packet on air reaching the module's antenna (or
    leaving it, once the module has begun hearing it: [reaches, ends, payload, heard so far or None])
    and the end of the module's own transmission: the air's side of a module's next_event."""
    for p in incoming:
        a = p[0] if p[3] is None else p[1]
        if t is None or a < t:
            t = a
    if tx_until > now and (t is None or tx_until < t):
        t = tx_until
    return t


class Receiving:
    """The receive side both LoRa modules share. A packet reaching the antenna waits in `incoming`
    as [start, end, payload, heard, ...]: heard is None until it starts, then whether the module
    was receiving as it began; at its end it is handed over if the module still receives and has
    not keyed up since it began. The module gives _rx_ready(at), _hand_over(packet, end),
    tx_start, `missed` and its NOT_RECEIVING and LEFT_RECEIVING reasons."""

    def _air(self, now):
        for p in list(self.incoming):
            start, end, payload = p[0], p[1], p[2]
            if p[3] is None and start <= now:
                p[3] = self._rx_ready(start)
                if not p[3]:
                    self.missed.append((start, payload, self.NOT_RECEIVING))
            if end <= now:
                self.incoming.remove(p)
                if p[3] and self._rx_ready(end) and self.tx_start < start:
                    self._hand_over(p, end)
                elif p[3]:
                    p[3] = False
                    self.missed.append((start, payload, self.LEFT_RECEIVING))
