# Uplink transports, one interface: send(frame) -> True when the frame left the device
# (for RYLR998: the module answered +OK; for Wi-Fi: the broker acknowledged), False otherwise.
from binlink.wire import framing

from binlink.firmware import log

_log = log.get("transport")


class UartFramed:
    """Wired serial, or an EBYTE E22/E32 in transparent mode: COBS + CRC frames on the UART.
    E22/E32 give no acknowledgement, so a frame written is a frame sent. With its mode pins
    wired (M0, M1, AUX), the module is woken for the send and put to sleep (~2 uA) afterwards:
    left in normal mode it would listen at ~12 mA and empty the battery in weeks."""

    AUX_TIMEOUT_MS = 2000  # the longest packet at SF12 is ~1.5 s on air

    def __init__(self, hw, port, m0=-1, m1=-1, aux=-1):
        self.hw = hw
        self.port = tuple(port)
        self.m0, self.m1, self.aux = m0, m1, aux

    def _mode(self, level):
        if self.m0 >= 0 and self.m1 >= 0:
            self.hw.pin_write(self.m0, level)
            self.hw.pin_write(self.m1, level)

    def _wait_idle(self):
        """AUX is low while the module is busy (waking, sending)."""
        if self.aux < 0:
            return True
        waited = 0
        while self.hw.pin_read(self.aux) == 0:
            if waited >= self.AUX_TIMEOUT_MS:
                _log.warning("radio module busy for %d ms", waited)
                return False
            self.hw.sleep_ms(5)
            waited += 5
        return True

    def send(self, frame):
        self._mode(0)  # normal (transmitting) mode
        if not self._wait_idle():
            return False
        self.hw.uart_write(self.port, framing.frame(frame))
        return self._wait_idle()  # out on air before the next frame or deep sleep

    def sleep(self):
        self._mode(1)  # M0 = M1 = 1: sleep

    def on_air_len(self, frame):
        return framing.framed_len(len(frame))


class Rylr998:
    """REYAX RYLR998: AT+SEND=<addr>,<len>,<hex>; waits for +OK, +ERR=n is a failure."""

    REPLY_TIMEOUT_MS = 1000

    def __init__(self, hw, port, addr):
        self.hw = hw
        self.port = tuple(port)
        self.addr = addr

    def send(self, frame):
        data = frame.hex().upper()
        if len(data) > 240:
            _log.error("frame of %d bytes too long for RYLR998", len(frame))
            return False
        self.hw.uart_flush_input(self.port)
        self.hw.uart_write(self.port, b"AT+SEND=%d,%d,%s\r\n" % (self.addr, len(data), data.encode()))
        # "+OK\r\n" is 5 bytes: ask for exactly that, so a success costs no timeout awake
        reply = self.hw.uart_read(self.port, 5, self.REPLY_TIMEOUT_MS)
        if reply.startswith(b"+OK"):
            return True
        reply += self.hw.uart_read(self.port, 4, 50)  # the rest of "+ERR=nn\r\n"
        _log.warning("RYLR998 send failed: %s", reply.strip() or b"no reply")
        return False

    def sleep(self):
        pass  # AT+MODE=1 would put it to sleep; left to the module's own low-power setting

    def on_air_len(self, frame):
        return 2 * len(frame)  # the module sends the ASCII characters


class WifiMqtt:
    """Bins within Wi-Fi reach: the same frame published with umqtt.simple (QoS 1)."""

    def __init__(self, hw, cfg):
        self.hw = hw
        self.cfg = cfg
        self.up = False

    def send(self, frame):
        c = self.cfg
        if not self.up:
            self.up = self.hw.wifi_connect(c["wifi_ssid"], c["wifi_password"], 8000)
            if not self.up:
                _log.warning("Wi-Fi %s not reachable", c["wifi_ssid"])
                return False
        try:
            self.hw.mqtt_publish("binlink-%06x" % c["device_id"], c["mqtt_host"], c["mqtt_port"], c["mqtt_user"],
                                 c["mqtt_password"], c["mqtt_topic"], frame)
            return True
        except OSError as e:
            _log.warning("MQTT publish failed: %s", e)
            return False

    def sleep(self):
        if self.up:
            self.hw.wifi_off()
            self.up = False

    def on_air_len(self, frame):
        return 0  # no duty cycle on Wi-Fi


def make(hw, cfg):
    kind = cfg["transport"]
    if kind in ("e22", "e32"):
        return UartFramed(hw, cfg["radio_uart"], cfg["radio_m0_pin"], cfg["radio_m1_pin"], cfg["radio_aux_pin"])
    if kind == "serial":
        return UartFramed(hw, cfg["radio_uart"])
    if kind == "rylr998":
        return Rylr998(hw, cfg["radio_uart"], cfg["rylr_addr"])
    if kind == "wifi":
        return WifiMqtt(hw, cfg)
    raise ValueError("unknown transport %s" % kind)


def duty_limited(cfg):
    return cfg["transport"] in ("e22", "e32", "rylr998")
