# Uplink transports, one interface: send(frame) -> True when the frame left the device
# (for RYLR998: the module answered +OK; for Wi-Fi: the broker acknowledged), False otherwise;
# setup() on a cold boot checks the module's settings and rewrites them where they differ;
# sleep() before deep sleep.
from binlink.wire import airtime, framing

from binlink.firmware import config, log

_log = log.get("transport")

ERP_LIMIT_DBM = 14  # EU868 865-868.6 MHz: 25 mW ERP (config.erp_dbm gives the channel's sub-band's)


def legal_dbm(levels, antenna_dbi, erp_dbm=ERP_LIMIT_DBM):
    """Highest module power level whose ERP (dBm + antenna gain - 2.15 dB) stays within the limit."""
    best = None
    for p in levels:
        if p + antenna_dbi - 2.15 <= erp_dbm + 1e-9 and (best is None or p > best):
            best = p
    return best if best is not None else min(levels)


class UartFramed:
    """Wired serial, or an EBYTE E22/E32 in transparent mode: COBS + CRC frames on the UART.
    E22/E32 give no acknowledgement, so a frame written is a frame sent. With its mode pins
    wired (M0, M1, AUX), the module is woken for the send and put to sleep (~2 uA) afterwards;
    M0/M1 are held through deep sleep (their weak pull-ups would sleep the module too, but a pad
    that floats near a threshold is no state to rely on for years)."""

    AUX_TIMEOUT_MS = 3000  # the longest packet at SF12 is ~2.8 s on air (the light sleep's bound: far below the watchdog's)
    PREAMBLE = 8  # LoRa's usual; EBYTE publishes none
    AUX_FALL_MS = 10  # a mode change is noticed (AUX falls) within a few ms; no change: AUX never falls
    # EBYTE air-rate codes for the spreading factor the duty-cycle maths uses (125 kHz, CR 4/5):
    # 0.3k ~ SF12, 1.2k ~ SF10, 2.4k ~ SF9 (factory), 4.8k ~ SF8, 9.6k ~ SF7; no rate is SF11:
    # the faster 1.2k keeps the duty-cycle maths on the safe side (it books more than is sent)
    AIR_CODE = {12: 0, 11: 1, 10: 1, 9: 2, 8: 3, 7: 4}

    def __init__(self, hw, port, kind="serial", m0=-1, m1=-1, aux=-1, cfg=None):
        self.hw = hw
        self.port = tuple(port)
        self.kind = kind
        self.m0, self.m1, self.aux = m0, m1, aux
        self.cfg = cfg
        self.pins = None  # (M0, M1) as written this wake; None: not yet (the module sleeps, pins held 1/1)
        self.stuck = False  # AUX never rose: not waited on again this wake (each wait costs 3 s awake)

    def _mode(self, m0, m1):
        """M0/M1, then the manual's sequence: the module notices the change (AUX falls), reloads its
        parameters with AUX low for a time the manual does not state, and the new mode is in force
        2 ms after AUX rises. Waiting for the fall first: a sample taken before the module noticed
        would see the old mode's AUX high."""
        if self.m0 < 0 or self.m1 < 0:
            return True
        if self.pins == (m0, m1):
            return True
        self.hw.pin_write(self.m0, m0, True)
        self.hw.pin_write(self.m1, m1, True)
        self.pins = (m0, m1)
        ok = self._wait_idle()
        self.hw.sleep_ms(2)
        return ok

    def _wait_idle(self):
        """AUX low, then high: low while the module reconfigures or holds data not yet handed to
        its RF chip. Both waits are bounded; a module whose AUX never rises is not waited on again.
        The fall is polled (1 ms steps); the low phase light-sleeps (0.8 mA, not ~40 mA awake)
        until ext0 sees AUX high, which wakes the chip at once if it already is. The UART receives
        nothing in light sleep, and nothing the bin waits for comes then: a module reconfiguring
        receives nothing, and the answer to an uplink comes after its time on air (listen.py)."""
        if self.aux < 0:
            return True
        if self.stuck:
            return False
        hw = self.hw
        waited = 0
        level = hw.pin_read(self.aux)
        while level == 1 and waited < self.AUX_FALL_MS:
            hw.sleep_ms(1)
            waited += 1
            level = hw.pin_read(self.aux)
        if level == 1:
            return True
        hw.light_sleep(self.AUX_TIMEOUT_MS, self.aux, 1)
        if hw.pin_read(self.aux) == 0:
            _log.warning("radio module busy for %d ms", self.AUX_TIMEOUT_MS)
            self.stuck = True
            return False
        return True

    def send(self, frame):
        if not self._mode(0, 0):  # normal (transmitting) mode
            return False
        self.hw.uart_write(self.port, framing.frame(frame))
        self.hw.uart_flush(self.port)  # every byte in the module before AUX means anything
        return self._wait_idle()  # handed to the RF chip: AUX rises while the packet is still on air

    def sleep(self):
        """M0 = M1 = 1 (E22 deep sleep / E32 sleep, ~2 uA), held through deep sleep. Not waited on:
        the module finishes the packet on air and then sleeps by itself (the manuals' fast sleep),
        so the ESP32 need not stay awake for the time on air."""
        if self.m0 < 0 or self.m1 < 0:
            return
        self.hw.pin_write(self.m0, 1, True)
        self.hw.pin_write(self.m1, 1, True)
        self.pins = (1, 1)

    def on_air_len(self, frame):
        return framing.framed_len(len(frame))

    def out_ms(self, n):
        """How long the module takes to hand n received bytes to the ESP32's UART (10 bits a byte)."""
        return n * 10000 // self.port[1] + 1

    def receive(self, until):
        """Frames that arrive on the UART before ticks_ms `until`, one at a time (a generator). The
        module is left in normal mode after the send (M0 = M1 = 0: it receives when not sending):
        it hands a packet heard on air to the UART whole, as COBS + CRC framed bytes."""
        from binlink.wire import downlink

        d = framing.Deframer(downlink.MAX_LEN + 8)
        for data in _arrivals(self.hw, self.port, until, self._idle):
            for kind, body, _ in d.feed(data):
                if kind == "frame":
                    yield body

    def _idle(self, left):
        hw = self.hw
        if self.aux >= 0 and hw.pin_read(self.aux) == 1:
            # nothing coming: light sleep (~0.8 mA) until AUX falls, 2-3 ms before the module
            # starts handing a received packet over (the manuals' "wake up the MCU")
            hw.light_sleep(left, self.aux, 0)
        else:
            hw.sleep_ms(self.POLL_MS)  # the packet is coming over (AUX low), or no AUX wired

    POLL_MS = 10  # the UART buffer (256 bytes) holds a whole downlink: polling only sets how late it is read

    def wanted(self):
        """Register values for this config: legal power, the air rate the airtime maths assumes."""
        c = self.cfg
        air = self.AIR_CODE[c["sf"]]
        if self.kind == "e22":
            dbm = legal_dbm((22, 17, 13, 10), c["antenna_dbi"], config.erp_dbm(c))
            power = {22: 0, 17: 1, 13: 2, 10: 3}[dbm]
            chan = c["radio_channel"]  # 850.125 + CH MHz (config: 16, 866.125 MHz, by default)
            # 02h NETID, 03h REG0 (9600 8N1 | air rate), 04h REG1 (240-byte packets | power), 05h REG2 channel
            return 0x02, bytes([c["radio_netid"] & 0xFF, 0x60 | air, power, chan])
        dbm = legal_dbm((20, 17, 14, 10), c["antenna_dbi"], config.erp_dbm(c))
        power = {20: 0, 17: 1, 14: 2, 10: 3}[dbm]
        chan = c["radio_channel"]  # 862 + CH MHz (config: 4, 866 MHz, by default)
        # ADDH ADDL SPED (8N1, 9600 | air rate) CHAN OPTION (push-pull, 250 ms, FEC | power)
        return 0, bytes([0, 0, 0x18 | air, chan, 0x44 | power])

    def setup(self):
        """Cold boot: read the module's registers in configuration mode, write them if they
        differ (saved in its flash), then sleep. False when the module does not answer."""
        if self.kind not in ("e22", "e32") or self.m0 < 0:
            return True
        addr, want = self.wanted()
        cfg_mode = (0, 1) if self.kind == "e22" else (1, 1)  # (M0, M1)
        ok = self._mode(cfg_mode[0], cfg_mode[1])
        if ok:
            if self.kind == "e22":
                read, write, reply = bytes([0xC1, addr, len(want)]), bytes([0xC0, addr, len(want)]) + want, 3
            else:
                read, write, reply = b"\xc1\xc1\xc1", b"\xc0" + want, 1
            self.hw.uart_flush_input(self.port)
            self.hw.uart_write(self.port, read)
            got = self.hw.uart_read(self.port, reply + len(want), 200)
            ok = len(got) == reply + len(want)
            if ok and got[reply:] != want:
                _log.info("radio module settings %s -> %s", got[reply:].hex(), want.hex())
                self.hw.uart_write(self.port, write)
                got = self.hw.uart_read(self.port, reply + len(want), 200)
                ok = got[reply:] == want
            if not ok:
                _log.error("radio module not answering in configuration mode")
        self.sleep()
        return ok


class Rylr998:
    """REYAX RYLR998: AT+SEND=<addr>,<len>,<hex>. +OK answers the command, not the end of the
    transmission: a second AT+SEND while the first is on air gets +ERR=17, so each send books
    the module busy for its time on air (the module adds 8 bytes to the payload)."""

    REPLY_TIMEOUT_MS = 1000
    OVERHEAD = 8
    PREAMBLE = 12  # the module's programmed preamble (PARAMETER's 4th field), in its time on air

    def __init__(self, hw, port, addr, cfg=None):
        self.hw = hw
        self.port = tuple(port)
        self.addr = addr
        self.cfg = cfg
        self.busy_until = None  # ticks_ms when the last packet is off the air
        self.awake = False

    def _command(self, cmd, timeout_ms=200):
        """One AT command, its reply line (b"" when none came)."""
        self.hw.uart_flush_input(self.port)
        self.hw.uart_write(self.port, cmd + b"\r\n")
        return self.hw.uart_readline(self.port, timeout_ms).strip()

    def _wake(self):
        """A sleeping module wakes on the UART; the command that woke it may not be executed."""
        if not self.awake:
            self.awake = self._command(b"AT", 50) == b"+OK" or self._command(b"AT") == b"+OK"
        return self.awake

    def _wait_off_air(self):
        if self.busy_until is not None:
            left = self.hw.ticks_diff(self.busy_until, self.hw.ticks_ms())
            if left > 0:
                self.hw.sleep_ms(left)

    def send(self, frame):
        data = frame.hex().upper()
        if len(data) > 240:
            _log.error("frame of %d bytes too long for RYLR998", len(frame))
            return False
        if not self._wake():
            _log.warning("RYLR998 not answering")
            return False
        for _ in range(2):
            self._wait_off_air()
            reply = self._command(b"AT+SEND=%d,%d,%s" % (self.addr, len(data), data.encode()), self.REPLY_TIMEOUT_MS)
            if reply == b"+OK":
                c = self.cfg
                toa = airtime.time_on_air_ms(len(data) + self.OVERHEAD, c["sf"], c["bandwidth_khz"], preamble=self.PREAMBLE)
                self.busy_until = self.hw.ticks_ms() + int(toa) + 10
                return True
            if reply != b"+ERR=17":  # 17: still on air (a send booked too short): wait once more
                break
            self.busy_until = self.hw.ticks_ms() + 50
        _log.warning("RYLR998 send failed: %s", reply or b"no reply")
        return False

    def wanted(self):
        c = self.cfg
        bw = {125: 7, 250: 8, 500: 9}[c["bandwidth_khz"]]
        return [(b"BAND", b"%d" % c["rylr_band_hz"]), (b"NETWORKID", b"%d" % c["radio_netid"]),
                (b"CRFOP", b"%d" % legal_dbm(range(0, 23), c["antenna_dbi"], config.erp_dbm(c))),
                (b"PARAMETER", b"%d,%d,1,%d" % (c["sf"], bw, self.PREAMBLE))]

    def setup(self):
        """Cold boot: band, network id, legal output power, SF/bandwidth as the airtime maths
        assumes; each queried, written only when different (the module keeps them in flash)."""
        if not self._wake():
            _log.error("RYLR998 not answering")
            return False
        for name, value in self.wanted():
            if self._command(b"AT+" + name + b"?") != b"+" + name + b"=" + value:
                if self._command(b"AT+" + name + b"=" + value) != b"+OK":
                    _log.error("RYLR998 refused %s=%s", name, value)
                    return False
        return True

    def sleep(self):
        if self.awake:
            self._wait_off_air()  # AT+MODE=1 during a transmission would cut it
            self._command(b"AT+MODE=1")  # ~8 uA instead of ~17 mA listening
            self.awake = False

    def on_air_len(self, frame):
        return 2 * len(frame) + self.OVERHEAD  # the ASCII hex characters, plus the module's own 8 bytes

    def out_ms(self, n):
        """+RCV=<addr>,<len>,<2n hex>,<rssi>,<snr> at the UART's rate: about 2n + 24 characters."""
        return (2 * n + 24) * 10000 // self.port[1] + 1

    def receive(self, until):
        """Frames the module reports as +RCV lines before ticks_ms `until` (a generator). The module
        receives whenever it is awake and not sending (AT+MODE=0, its transceiver mode)."""
        hw = self.hw
        if self.earliest is not None:
            # nothing can come before the uplink is off the air and a shortest answer has been on air:
            # light sleep until then (no AUX to wake on, and the UART does not receive in light sleep)
            left = hw.ticks_diff(self.earliest, hw.ticks_ms())
            if left > 0:
                hw.light_sleep(left)
        buf = b""
        for data in _arrivals(hw, self.port, until, lambda left: hw.sleep_ms(self.POLL_MS)):
            buf += data
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                frame = _rcv(line.strip())
                if frame is not None:
                    yield frame
            if len(buf) > RCV_LINE_MAX:  # noise without a line end: keep only what a +RCV line can be
                buf = buf[-RCV_LINE_MAX:]

    POLL_MS = 20  # a +RCV line of a longest downlink (~130 characters) fits the UART buffer: no loss
    earliest = None  # ticks_ms before which no answer can arrive (set by the listener)


def _arrivals(hw, port, until, idle):
    """What the UART receives before ticks_ms `until`, as it comes; idle(ms left) between reads
    that found nothing (a module's receive window)."""
    while True:
        left = hw.ticks_diff(until, hw.ticks_ms())
        if left <= 0:
            return
        data = hw.uart_read_any(port)
        if data:
            yield data
        else:
            idle(left)


RCV_LINE_MAX = 160  # +RCV=<addr>,<len>,<102 hex>,<rssi>,<snr>: a longest downlink's line, with room


def _rcv(line):
    """The frame in a +RCV=<addr>,<len>,<data>,<rssi>,<snr> line (data in ASCII hex), or None.
    Split on the first two and the last two commas, as the gateway does."""
    if not line.startswith(b"+RCV="):
        return None
    i = line.find(b",")
    j = line.find(b",", i + 1)
    k = line.rfind(b",")
    k2 = line.rfind(b",", 0, k)
    if i < 0 or j < 0 or k2 <= j:
        return None
    data = line[j + 1:k2]
    try:
        if int(line[i + 1:j]) != len(data):
            return None
        return bytes.fromhex(data.decode())
    except ValueError:
        return None


class WifiMqtt:
    """Bins within Wi-Fi reach: the same frames published with umqtt.simple (QoS 1), one MQTT
    session per wake. The session subscribes to the bin's downlink topic before its first
    publish, so an answer cannot come before the bin can hear it (clean session: nothing is
    queued for a sleeping bin, an answer is worth only the window it is meant for)."""

    CONNECT_TIMEOUT_MS = 8000
    POLL_MS = 20  # between reads of the socket while listening: how late an answer is taken
    PREAMBLE = 0  # no air: listen.window_ms adds no time on air

    def __init__(self, hw, cfg):
        self.hw = hw
        self.cfg = cfg
        self.up = False
        self.session = None
        self.inbox = []

    def setup(self):
        return True

    def _open(self):
        c = self.cfg
        if not self.up:
            self.up = self.hw.wifi_connect(c["wifi_ssid"], c["wifi_password"], self.CONNECT_TIMEOUT_MS)
            if not self.up:
                _log.warning("Wi-Fi %s not reachable", c["wifi_ssid"])
                return False
        if self.session is None:
            self.hw.wdt_feed()
            session = self.hw.mqtt_open("binlink-%06x" % c["device_id"], c["mqtt_host"], c["mqtt_port"],
                                        c["mqtt_user"], c["mqtt_password"])
            self.session = session  # closed by sleep() even if the subscription fails
            topic = "%s/%06x" % (c["mqtt_downlink_topic"], c["device_id"])
            if c["mqtt_downlink_topic"] and not self.hw.mqtt_subscribe(session, topic, self.inbox):
                _log.warning("broker refused the subscription to %s: no answers heard", topic)
        return True

    def send(self, frame):
        try:
            if not self._open():
                return False
            self.hw.wdt_feed()
            self.hw.mqtt_publish(self.session, self.cfg["mqtt_topic"], frame)
            return True
        except OSError as e:
            _log.warning("MQTT publish failed: %s", e)
            self._close()  # a broken session is not used again in this wake
            return False

    def receive(self, until):
        """Answers on the downlink topic before ticks_ms `until` (a generator)."""
        hw = self.hw
        while self.session is not None:
            while self.inbox:
                yield self.inbox.pop(0)
            if hw.ticks_diff(until, hw.ticks_ms()) <= 0:
                return
            try:
                hw.mqtt_poll(self.session)
            except OSError as e:
                _log.warning("MQTT read failed: %s", e)
                self._close()
                return
            if not self.inbox:
                hw.sleep_ms(self.POLL_MS)

    def _close(self):
        if self.session is not None:
            self.hw.mqtt_close(self.session)
            self.session = None
        del self.inbox[:]

    def sleep(self):
        self._close()
        if self.up:
            self.hw.wifi_off()
            self.up = False

    def on_air_len(self, frame):
        return 0  # no duty cycle on Wi-Fi

    def out_ms(self, n):
        return 0  # an answer is read from the socket as a whole


def make(hw, cfg):
    kind = cfg["transport"]
    if kind in ("e22", "e32"):
        return UartFramed(hw, cfg["radio_uart"], kind, cfg["radio_m0_pin"], cfg["radio_m1_pin"], cfg["radio_aux_pin"], cfg)
    if kind == "serial":
        return UartFramed(hw, cfg["radio_uart"])
    if kind == "rylr998":
        return Rylr998(hw, cfg["radio_uart"], cfg["rylr_addr"], cfg)
    return WifiMqtt(hw, cfg)  # config.parse refuses any other transport


def duty_limited(cfg):
    return cfg["transport"] in ("e22", "e32", "rylr998")
