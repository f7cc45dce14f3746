"""EBYTE E22-900T22S/D (SX1262) and E32-868T20D (SX1276) UART LoRa modules, transparent mode.

From the EBYTE user manuals (E22-900T22S "Operating modes", "AUX", "Register description";
E32-868T20D "Operating modes", "Parameter setting"):
- Mode from M1/M0. E22: 00 normal, 01 WOR, 10 configuration, 11 deep sleep. E32: 00 normal,
  01 wake-up, 10 power saving, 11 sleep (also the configuration mode).
- M0 and M1 have weak internal pull-ups: a floating pin reads 1, so an undriven module sleeps.
- After M0/M1 change the module notices (~1 ms), drives AUX low while it reconfigures (leaving
  sleep: it reloads its parameters; the manuals give no duration), and the new mode takes effect
  2 ms after AUX rises again. Bytes arriving before that are lost. A switch requested while a
  packet is on air happens once it is sent (the manuals' "fast sleep" after the last packet).
- AUX is low while bytes wait in the module's buffer; it rises once the last of them has been
  handed to the RF chip, while that packet is still on air.
- A configuration command's reply comes within ~125 ms (EBYTE's libraries wait up to that long).
- In normal mode a packet goes on air once the UART has been idle for 3 byte-times or a
  sub-packet is full (E22: 240 bytes by default, E32: 58).
- Configuration only at 9600 8N1. E22: C0/C2 addr len data (write; C0 saves) -> C1 addr len data;
  C1 addr len -> C1 addr len data. E32: C0/C2 + 5 bytes, C1 C1 C1 -> C0 + 5 bytes.
- Factory settings: E22 22 dBm, air rate 2.4k, channel 18 (868.125 MHz), UART 9600.
  E32 20 dBm, 2.4k, channel 6 (868 MHz). 22 dBm exceeds EU868 g1's 14 dBm ERP.
- E22 REG3 bit 7: one RSSI byte after each received packet (dBm = -(256 - value)).
- Receiving (E22-900T22S manual "Normal mode (mode 0)": the module receives wireless data and
  outputs it through the serial port; E32-868T20D manual "AUX": AUX outputs low 2-3 ms before the
  serial output starts, to wake the MCU, and rises when it ends): only in normal mode, only at the
  same air rate and channel, the whole packet before any byte of it goes out on the UART. A packet
  that begins while the module sleeps, reconfigures or transmits, or during which it leaves normal
  mode or keys up (half-duplex), is lost; two packets that overlap on air are both lost (no capture
  effect modelled).
- Current (datasheet "Electrical parameters"): E22 TX 110 mA at 22 dBm, RX ~12 mA (receiving or
  idle in normal mode: the radio listens all the time there), deep sleep
  2 uA. E32 TX 110 mA at 20 dBm, RX ~14 mA, sleep 2 uA. At lower powers the module keeps its PA
  biased for full power and only lowers the drive, so the current falls far less than the power
  (SX1276 PA_BOOST: ~87 mA at 17 dBm; no EBYTE figure: docs/hardware.md).

The air rate has no published spreading factor; the model maps it to the LoRa rate it matches at
125 kHz, CR 4/5 (0.3k -> SF12, 1.2k -> SF10, 2.4k -> SF9, 4.8k -> SF8, 9.6k -> SF7).
Timings the manuals leave open are drawn per event from a range (`timing="slow"`: always the slow
end, what the tests hold the firmware to): noticing a pin change DETECT_MS, reconfiguring
RECONFIG_MS (library authors wait up to 40 ms), the configuration reply REPLY_MS."""
import math

from binlink.sim.parts import lora

NORMAL, MODE1, MODE2, MODE3 = 0, 1, 2, 3
DETECT_MS = (0.5, 3.0)  # "~1 ms"; ASSUMED range, its slow end past a 2 ms sample
SETTLE_MS = 2.0
RECONFIG_MS = (4.0, 40.0)  # AUX low while reconfiguring; ASSUMED range (xreef's libraries wait 40 ms)
REPLY_MS = (5.0, 125.0)  # configuration command -> reply (issue 19: up to ~125 ms)
AUX_LEAD_MS = (2.0, 3.0)  # AUX low this long before a received packet's first byte on the UART


def slow_end(lo_hi):
    return lo_hi[1]
AIR_RATE = {0: (12, 125), 1: (10, 125), 2: (9, 125), 3: (8, 125), 4: (7, 125), 5: (7, 250), 6: (7, 500), 7: (7, 500)}
UART_BAUD = {0: 1200, 1: 2400, 2: 4800, 3: 9600, 4: 19200, 5: 38400, 6: 57600, 7: 115200}


class E22(lora.Receiving):
    NAME = "E22-900T22S"
    CONFIG_MODE = MODE2
    SLEEP_MODE = MODE3
    SUBPACKET = 240
    POWER_DBM = {0: 22, 1: 17, 2: 13, 3: 10}
    TX_MA = {22: 110.0, 17: 95.0, 13: 80.0, 10: 70.0}  # 22 dBm: datasheet; lower: ASSUMED (PA biased for 22 dBm)
    RX_MA = 12.0
    SLEEP_MA = 0.002
    EVENTS_CACHED = True  # the board may keep next_event() until touched() (parts/board.py, Board._next_stop)

    def touched(self):
        """What next_event() answers may have changed (the board sets its own: it keeps the answer)."""

    def __init__(self, m0, m1, aux, transmit, draw=slow_end):
        """draw((lo, hi)) -> a duration from that range (the board's: random, or the slow end)."""
        self.draw = draw
        self.m0, self.m1, self.aux = m0, m1, aux
        self.transmit = transmit  # transmit(payload bytes, on-air length, sf, bw, dbm)
        self.regs = bytearray([0x00, 0x00, 0x00, 0x62, 0x00, 0x12, 0x03, 0x00, 0x00])  # factory
        self.mode = self.SLEEP_MODE
        self.levels = {}
        self.pending = None  # (mode, detected at, AUX high at, effective at)
        self.inbound = []  # [arrival ms, byte, baud]
        self.buf = bytearray()
        self.last_rx = 0.0
        self.tx_until = -1.0
        self.deliver = None  # deliver(bytes, start ms, baud): to the ESP32's UART
        self.lost_bytes = 0
        self.packets = []  # (start ms, payload) as sent on air
        self.dead = False  # fault: module not answering (no power, broken)
        self.incoming = []  # packets reaching the antenna: [start ms, end ms, payload, heard so far (None: not begun)]
        self.rx_out = None  # (AUX low from, AUX high at): a received packet going out on the UART
        self.tx_start = -1.0  # when the last own packet went on air
        self.received = []  # (end ms, payload) handed to the UART
        self.missed = []  # (start ms, payload, why) lost

    # registers ----------------------------------------------------------------------------------
    def air(self):
        return AIR_RATE[self.regs[3] & 7]

    def baud(self):
        return UART_BAUD[self.regs[3] >> 5]

    def tx_dbm(self):
        return self.POWER_DBM[self.regs[4] & 3]

    def rssi_byte(self):
        return bool(self.regs[6] & 0x80)

    def freq_mhz(self):
        return 850.125 + self.regs[5]  # REG2: 850.125 + CH MHz

    # pins ---------------------------------------------------------------------------------------
    def mode_from_pins(self):
        m0 = self.levels.get(self.m0)
        m1 = self.levels.get(self.m1)
        return (1 if m1 is None else m1) * 2 + (1 if m0 is None else m0)  # weak pull-ups: floating = 1

    def on_pin(self, pin, level, now):
        levels = self.levels
        levels[pin] = level
        m0 = levels.get(self.m0)  # mode_from_pins()
        m1 = levels.get(self.m1)
        target = (1 if m1 is None else m1) * 2 + (1 if m0 is None else m0)
        current = self.pending[0] if self.pending else self.mode
        if target == current:
            return
        start = max(now, self.tx_until) + self.draw(DETECT_MS)
        high = start + self.draw(RECONFIG_MS)
        self.pending = (target, start, high, high + SETTLE_MS)
        self.touched()

    def aux_level(self, now):
        if self.dead:
            return 0
        if self.pending and self.pending[1] <= now < self.pending[2]:
            return 0
        if self.rx_out and self.rx_out[0] <= now < self.rx_out[1]:
            return 0
        if self.buf:  # data not yet handed to the RF chip (the packet on air does not hold AUX low)
            return 0
        return 1

    def aux_next(self, now):
        """When AUX may next change by the module's own timeline after `now` (a mode switch noticed
        or done, a hand-over beginning or ending), or None; its other changes (bytes in, a packet
        keyed up) come at next_event(). A light sleep waiting on AUX wakes there (Board.op_lightsleep)."""
        t = None
        for edge in (self.pending[1:3] if self.pending else ()) + (self.rx_out or ()):
            if edge > now and (t is None or edge < t):
                t = edge
        return t

    # UART ---------------------------------------------------------------------------------------
    def power_on(self):
        """Supply cut: what was in the buffers is gone; settings kept in the module's flash stay."""
        self.inbound = []
        self.tx_until = -1.0
        self.buf = bytearray()
        self.pending = None
        self.touched()

    def uart_rx(self, data, start, byte_ms, baud):
        for i, b in enumerate(data):
            self.inbound.append([start + (i + 1) * byte_ms, b, baud])
        self.touched()

    def _due(self):
        """(time, kind) of what the module does next — 0 the mode switch takes effect, 1 a byte comes
        in from the UART, 2 a packet goes on air; the lower kind first at the same time — or (None, None)."""
        t = kind = None
        if self.pending:
            t, kind = self.pending[3], 0
        if self.inbound:
            a = self.inbound[0][0]
            if t is None or a < t:
                t, kind = a, 1
        if self.buf and self.mode == NORMAL:
            a = self._send_due()
            if t is None or a < t:
                t, kind = a, 2
        return t, kind

    def _send_due(self):
        """A packet goes on air once the UART has been idle 3 byte-times or a sub-packet is full,
        not before the one on air is out."""
        due = self.last_rx if len(self.buf) >= self.SUBPACKET else self.last_rx + 3 * 10000.0 / self.baud()
        return max(due, self.tx_until)

    def next_event(self, now):
        """The earliest of _due(), a packet on air reaching the antenna or leaving it, and the end of
        a transmission."""
        return lora.next_air_event(self._due()[0], self.incoming, self.tx_until, now)

    def quiet_bytes(self, now, end):
        """The arrival times (up to end) of the bytes coming in from the UART, from the first on,
        that only join the buffer or are lost before anything else the module does: through them it
        draws the same, sends and answers nothing, and its step() may come after the last of them
        (the board's Board._quiet_run). Asked while none of its events is due by `now`. step()'s
        own rules, in its order: the mode switch first at the same time, then a byte, then a packet."""
        if self.mode == self.CONFIG_MODE:
            return ()
        pending = self.pending
        limit = pending[3] if pending else math.inf
        for p in self.incoming:
            a = p[0] if p[3] is None else p[1]
            if a < limit:
                limit = a
        tx_until = self.tx_until
        if now < tx_until < limit:
            limit = tx_until
        normal = self.mode == NORMAL
        baud = self.baud()
        joins = normal and not self.dead
        deaf_from = pending[1] if pending else math.inf  # _listening()
        n, last = len(self.buf), self.last_rx
        out = []
        for at, b, rate in self.inbound:
            if at >= limit or at > end:
                break
            if normal and n and max(last if n >= self.SUBPACKET else last + 3 * 10000.0 / baud, tx_until) < at:
                break  # a packet goes on air before this byte
            if joins and at < deaf_from and rate == baud:
                n, last = n + 1, at
            if normal and n and max(last if n >= self.SUBPACKET else last + 3 * 10000.0 / baud, tx_until) <= at:
                break  # ... or right after it, in its step
            out.append(at)
        return out

    def take_bytes(self, n):
        """The first n bytes from the UART as step() takes them, when quiet_bytes() gave them."""
        pending = self.pending
        deaf_from = pending[1] if pending else math.inf  # _listening()
        joins = self.mode == NORMAL and not self.dead
        baud = self.baud()
        for at, b, rate in self.inbound[:n]:
            if joins and at < deaf_from and rate == baud:
                self.buf.append(b)
                self.last_rx = at
            else:
                self.lost_bytes += 1  # asleep, reconfiguring, wrong mode or wrong baud
        del self.inbound[:n]
        self.touched()

    def step(self, now):
        """Acts on what is due by `now`; True when what the module draws may have changed (its mode,
        its registers, a packet keyed up)."""
        if self.incoming:
            self.touched()
            self._air(now)
        acted = False
        while True:
            t, kind = self._due()
            if t is None or t > now:
                return acted
            self.touched()
            acted = acted or kind != 1 or self.mode == self.CONFIG_MODE  # a byte in normal mode only fills the buffer
            if kind == 0:
                self.mode = self.pending[0]
                self.pending = None
            elif kind == 1:
                at, b, baud = self.inbound.pop(0)
                self._byte(at, b, baud)
            else:
                self._send(t)

    # the air ----------------------------------------------------------------------------------------
    def air_rx(self, payload, start, sf, bw_khz, freq_mhz=None, **kw):
        """A packet on air reaching the antenna from `start` (ms); returns its end. Heard only at
        the module's own air rate and channel, and alone on air."""
        end = start + 1000.0 * lora.time_on_air_s(len(payload), sf, bw_khz * 1000)
        ok = (sf, bw_khz) == self.air() and (freq_mhz is None or abs(freq_mhz - self.freq_mhz()) < 0.001)
        for p in self.incoming:
            if p[0] < end and start < p[1]:  # overlapping on air: neither is demodulated
                p[3] = False
                ok = False
        p = [start, end, bytes(payload), None if ok else False]
        if not ok:
            self.missed.append((start, p[2], "other rate, channel or a collision"))
        self.incoming.append(p)
        self.touched()
        return end

    def _rx_ready(self, at):
        """Receiving: normal mode in force, not reconfiguring, not sending."""
        return (not self.dead and self.mode == NORMAL and not (self.pending and self.pending[1] <= at)
                and self.tx_until <= at)

    NOT_RECEIVING = "not receiving (asleep, reconfiguring or sending)"
    LEFT_RECEIVING = "left normal mode or keyed up while receiving"

    def _hand_over(self, packet, end):
        """The packet to the ESP32's UART, after AUX's lead."""
        payload = packet[2]
        lead = self.draw(AUX_LEAD_MS)
        data = payload + (bytes([256 - 60]) if self.rssi_byte() else b"")  # -60 dBm: a near gateway
        first = end + lead
        self.rx_out = (end, first + len(data) * 10000.0 / self.baud())
        self.received.append((end, payload))
        if self.deliver:
            self.deliver(data, first, self.baud())

    def _listening(self, at):
        return not self.dead and not (self.pending and self.pending[1] <= at)

    def _byte(self, at, b, baud):
        if not self._listening(at):
            self.lost_bytes += 1
            return
        if self.mode == NORMAL and baud == self.baud():
            self.buf.append(b)
            self.last_rx = at
        elif self.mode == self.CONFIG_MODE and baud == 9600:
            self.buf.append(b)
            self.last_rx = at
            self._config(at)
        else:
            self.lost_bytes += 1  # asleep, wrong mode or wrong baud: nothing is understood

    def _send(self, t):
        if self.mode != NORMAL:
            self.buf = bytearray()
            return
        payload = bytes(self.buf[: self.SUBPACKET])
        del self.buf[: self.SUBPACKET]
        sf, bw = self.air()
        self.tx_until = t + 1000.0 * lora.time_on_air_s(len(payload), sf, bw * 1000)
        self.tx_start = t
        self.packets.append((t, payload))
        self.transmit(payload, len(payload), sf, bw, self.tx_dbm())

    def _config(self, at):
        b = self.buf
        if b[0] not in (0xC0, 0xC1, 0xC2):
            self.buf = bytearray()
            return
        if len(b) < 3:
            return
        addr, n = b[1], b[2]
        if b[0] == 0xC1:
            reply = bytes([0xC1, addr, n]) + bytes(self.regs[addr: addr + n])
        else:
            if len(b) < 3 + n:
                return
            self.regs[addr: addr + n] = b[3: 3 + n]
            reply = bytes([0xC1, addr, n]) + bytes(b[3: 3 + n])
        self.buf = bytearray()
        if self.deliver:
            self.deliver(reply, at + self.draw(REPLY_MS), 9600)

    def current_until(self, now):
        """When what it draws changes by itself: the packet on air is out."""
        return self.tx_until if now < self.tx_until else None

    def current_ma(self, now):
        if self.dead:
            return 0.0
        if now < self.tx_until:
            return self.TX_MA[self.tx_dbm()]
        return self.SLEEP_MA if self.mode == self.SLEEP_MODE else self.RX_MA


class E32(E22):
    """E32-868T20D: same pins and AUX rules; 5 parameter bytes (ADDH ADDL SPED CHAN OPTION),
    configured in sleep mode (M1 = M0 = 1), 58-byte packets, no RSSI byte."""

    NAME = "E32-868T20D"
    CONFIG_MODE = MODE3
    SUBPACKET = 58
    POWER_DBM = {0: 20, 1: 17, 2: 14, 3: 10}
    TX_MA = {20: 110.0, 17: 87.0, 14: 70.0, 10: 60.0}  # 20: datasheet; 17: SX1276 PA_BOOST; lower: ASSUMED
    RX_MA = 14.0

    def __init__(self, m0, m1, aux, transmit, draw=slow_end):
        E22.__init__(self, m0, m1, aux, transmit, draw)
        self.params = bytearray([0x00, 0x00, 0x1A, 0x06, 0x44])  # factory: 9600 8N1, 2.4k, 868 MHz, 20 dBm

    def air(self):
        return AIR_RATE[self.params[2] & 7]

    def baud(self):
        return UART_BAUD[(self.params[2] >> 3) & 7]

    def tx_dbm(self):
        return self.POWER_DBM[self.params[4] & 3]

    def rssi_byte(self):
        return False

    def freq_mhz(self):
        return 862.0 + self.params[3]  # CHAN: 862 + CH MHz

    def _config(self, at):
        b = self.buf
        if b[0] not in (0xC0, 0xC1, 0xC2):
            self.buf = bytearray()
            return
        if b[0] == 0xC1:
            if len(b) < 3:
                return
            reply = bytes([0xC0]) + bytes(self.params)
        else:
            if len(b) < 6:
                return
            self.params[:] = b[1:6]
            reply = bytes([0xC0]) + bytes(self.params)
        self.buf = bytearray()
        if self.deliver:
            self.deliver(reply, at + self.draw(REPLY_MS), 9600)
