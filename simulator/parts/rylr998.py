"""REYAX RYLR998 (SX1262) LoRa module driven by AT commands (REYAX "LoRa AT command guide",
RYLR998/RYLR498, and the RYLR998 datasheet):
- UART 115200 8N1 by default (AT+IPR); every command ends with \\r\\n and gets +OK, +ERR=n or a
  value (+BAND=..., +NETWORKID=..., +CRFOP=..., +PARAMETER=...).
- AT+SEND=<addr>,<len>,<data>: +OK answers the command; the packet is then on air for the time
  on air of len + 8 bytes ("the payload part will increase more 8 bytes than the actual data
  length"). A second AT+SEND before it is done gets +ERR=17 ("last TX was not completed").
  len > 240: +ERR=13; len not matching the data: +ERR=5.
- AT+MODE=1 sleeps the module; UART activity wakes it, and the command that woke it is not
  executed (no reply) — the guide does not say it is, so the model takes the cautious reading.
- AT+PARAMETER=<SF>,<BW>,<CR>,<preamble>: SF7-9 only at 125 kHz, SF7-10 at 250 kHz, SF7-11 at
  500 kHz (the 2023 guide); anything else is refused (+ERR=4 here: the guide names no code for it).
  The packet's time on air counts the programmed preamble (12 by default), not LoRa's usual 8.
- Factory: BAND 915000000, NETWORKID 18, CRFOP 22 dBm, PARAMETER 9,7,1,12 (SF9, 125 kHz, 4/5, 12).
  Settings are kept in the module's flash (they survive power loss).
- Receiving: awake and not sending (AT+MODE=0, the transceiver mode), a packet from a module on the
  same BAND, NETWORKID and PARAMETER comes out on the UART once received whole, as
  +RCV=<address>,<length>,<data>,<RSSI>,<SNR> (the guide's "+RCV" unsolicited line; data as sent, in
  ASCII). A packet that begins while the module sleeps or sends, or during which it is put to sleep
  or sends, is lost; overlapping packets are both lost (no capture effect modelled).
- Current (datasheet): TX ~120 mA at 22 dBm (~45 mA at 14 dBm), RX ~17 mA (awake: it receives all
  the time), sleep ~8 uA."""
from binlink.sim.parts import lora

OVERHEAD = 8
REPLY_MS = 4.0  # command processed, reply starts
BW_KHZ = {7: 125, 8: 250, 9: 500}
MAX_SF = {7: 9, 8: 10, 9: 11}  # highest spreading factor the module takes at each bandwidth code


class Rylr998(lora.Receiving):
    RX_MA = 17.0
    SLEEP_MA = 0.008

    EVENTS_CACHED = True  # the board may keep next_event() until touched() (parts/board.py, Board._next_stop)

    def touched(self):
        """What next_event() answers may have changed (the board sets its own: it keeps the answer)."""

    def __init__(self, transmit):
        self.transmit = transmit  # transmit(payload bytes, on-air length, sf, bw, dbm)
        self.baud = 115200
        self.settings = {"BAND": "915000000", "NETWORKID": "18", "CRFOP": "22", "ADDRESS": "0",
                         "PARAMETER": "9,7,1,12"}
        self.asleep = False
        self.line = b""
        self.inbound = []
        self.tx_until = -1.0
        self.deliver = None
        self.dead = False
        self.err17 = 0
        self.sent = []  # (start ms, payload bytes)
        self.incoming = []  # [start ms, end ms, data, heard so far (None: not begun), sender address]
        self.tx_start = -1.0
        self.received = []  # (end ms, data)
        self.missed = []  # (start ms, data, why)

    def sf_bw(self):
        p = self.settings["PARAMETER"].split(",")
        return int(p[0]), BW_KHZ.get(int(p[1]), 125)

    def preamble(self):
        return int(self.settings["PARAMETER"].split(",")[3])

    @staticmethod
    def parameter_ok(arg):
        p = arg.split(",")
        if len(p) != 4 or not all(x.isdigit() for x in p):
            return False
        sf, bw, cr, pre = (int(x) for x in p)
        return bw in MAX_SF and 7 <= sf <= MAX_SF[bw] and 1 <= cr <= 4 and 4 <= pre <= 24

    def freq_mhz(self):
        return int(self.settings["BAND"]) / 1e6

    def dbm(self):
        return int(self.settings["CRFOP"])

    def power_on(self):
        """Supply cut: what was in the buffers is gone; settings kept in the module's flash stay."""
        self.inbound = []
        self.tx_until = -1.0
        self.line = b""
        self.asleep = False
        self.touched()

    def uart_rx(self, data, start, byte_ms, baud):
        for i, b in enumerate(data):
            self.inbound.append([start + (i + 1) * byte_ms, b, baud])
        self.touched()

    def next_event(self, now):
        return lora.next_air_event(self.inbound[0][0] if self.inbound else None, self.incoming, self.tx_until, now)

    def air_rx(self, data, start, sf, bw_khz, freq_mhz=None, netid=None, address=0, preamble=12, **kw):
        """A packet (its data as the sending module's AT+SEND carried them) on air from `start` (ms)
        at sf/bw_khz; returns its end. Heard only on this module's band, network id and parameters."""
        end = start + 1000.0 * lora.time_on_air_s(len(data) + OVERHEAD, sf, bw_khz * 1000, preamble=preamble)
        ok = ((sf, bw_khz) == self.sf_bw() and (freq_mhz is None or abs(freq_mhz - self.freq_mhz()) < 0.001)
              and (netid is None or str(netid) == self.settings["NETWORKID"]))
        for p in self.incoming:
            if p[0] < end and start < p[1]:
                p[3] = False
                ok = False
        if not ok:
            self.missed.append((start, bytes(data), "other band, network, parameters or a collision"))
        self.incoming.append([start, end, bytes(data), None if ok else False, address])
        self.touched()
        return end

    def _rx_ready(self, at):
        return not self.dead and not self.asleep and self.tx_until <= at

    NOT_RECEIVING = "not receiving (asleep or sending)"
    LEFT_RECEIVING = "put to sleep or sent while receiving"

    def _hand_over(self, packet, end):
        """A +RCV line with the sender's address and the data as its AT+SEND carried them."""
        data = packet[2]
        self.received.append((end, data))
        line = b"+RCV=%d,%d,%s,-60,10" % (packet[4], len(data), data)  # RSSI -60 dBm, SNR 10 dB: a near gateway
        self._reply(line.decode("latin-1"), end)

    def step(self, now):
        """Acts on what is due by `now`; True when what the module draws may have changed (a
        command came in: sleep, a packet keyed up, the power setting)."""
        if self.incoming:
            self.touched()
            self._air(now)
        acted = False
        while self.inbound and self.inbound[0][0] <= now:
            self.touched()
            acted = True
            at, b, baud = self.inbound.pop(0)
            if self.dead:
                continue
            if baud != self.baud:
                self.line = b""
                continue
            self.line += bytes([b])
            if self.line.endswith(b"\r\n"):
                line, self.line = self.line[:-2], b""
                if self.asleep:
                    self.asleep = False  # woken: this command is not executed
                    continue
                self._reply(self._command(line.decode("latin-1"), at), at)
        return acted

    def _reply(self, text, at):
        if text and self.deliver:
            self.deliver(text.encode() + b"\r\n", at + REPLY_MS, self.baud)

    def _command(self, line, at):
        if line == "AT":
            return "+OK"
        if not line.startswith("AT+"):
            return "+ERR=2"
        name, _, arg = line[3:].partition("=")
        if name.endswith("?"):
            key = name[:-1]
            return "+%s=%s" % (key, self.settings[key]) if key in self.settings else "+ERR=4"
        if name == "SEND":
            return self._send(arg, at)
        if name == "MODE":
            self.asleep = arg.split(",")[0] == "1"
            return "+OK"
        if name == "IPR":
            self.baud = int(arg)
            return "+OK"
        if name == "PARAMETER" and not self.parameter_ok(arg):
            return "+ERR=4"
        if name in self.settings:
            self.settings[name] = arg
            return "+OK"
        return "+ERR=4"

    def _send(self, arg, at):
        parts = arg.split(",", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return "+ERR=4"
        n, data = int(parts[1]), parts[2].encode("latin-1")
        if n > 240:
            return "+ERR=13"
        if n != len(data):
            return "+ERR=5"
        if at < self.tx_until:
            self.err17 += 1
            return "+ERR=17"
        sf, bw = self.sf_bw()
        start = at + REPLY_MS
        self.tx_until = start + 1000.0 * lora.time_on_air_s(n + OVERHEAD, sf, bw * 1000, preamble=self.preamble())
        self.sent.append((start, data))
        self.tx_start = start
        self.transmit(data, n + OVERHEAD, sf, bw, self.dbm())
        return "+OK"

    def current_until(self, now):
        """When what it draws changes by itself: the packet on air is out."""
        return self.tx_until if now < self.tx_until else None

    def current_ma(self, now):
        if self.dead:
            return 0.0
        if now < self.tx_until:
            return 120.0 if self.dbm() > 17 else 45.0
        return self.SLEEP_MA if self.asleep else self.RX_MA
