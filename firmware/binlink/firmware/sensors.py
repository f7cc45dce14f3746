# Ultrasonic sensor drivers, one interface: ping() -> distance in mm at the nominal speed of
# sound (343 m/s), or None for no echo / bad frame. measure.py corrects for temperature.
NOMINAL_MM_PER_US = 0.343  # 343 m/s


class EchoSensor:
    """Trigger/echo sensors (JSN-SR04T, HC-SR04) through machine.time_pulse_us."""

    def __init__(self, hw, trig, echo, max_mm):
        self.hw = hw
        self.trig = trig
        self.echo = echo
        # wait for an echo from twice the range, plus margin; no echo: the JSN-SR04T holds ~60 ms
        self.timeout_us = int(2 * max_mm / NOMINAL_MM_PER_US) + 2000

    def ping(self):
        t = self.hw.pulse_us(self.trig, self.echo, self.timeout_us)
        if t < 0:  # -1: echo never went high, -2: stayed high past the timeout (no echo)
            return None
        return t * NOMINAL_MM_PER_US / 2


class A02yyuw:
    """DFRobot A02YYUW UART sensor: 9600 8N1, frames 0xFF H L SUM, SUM = (0xFF + H + L) & 0xFF.
    With its RX line idle-high (our TX) it streams a processed frame every 100-300 ms, read or
    not: a ping drops what is buffered (older readings) and waits for the next whole frame."""

    FRAME_TIMEOUT_MS = 400  # one 300 ms interval, a frame's 4 ms, and margin

    def __init__(self, hw, port):
        self.hw = hw
        self.port = tuple(port)

    def ping(self):
        hw = self.hw
        hw.uart_flush_input(self.port)
        buf = b""
        start = hw.ticks_ms()
        while True:
            left = self.FRAME_TIMEOUT_MS - hw.ticks_diff(hw.ticks_ms(), start)
            if left <= 0:
                return None
            buf += hw.uart_read(self.port, 4, left)
            mm = parse_a02(buf, 0)
            if mm is not None:
                return mm or None  # 0: the sensor's own "no target"
            if len(buf) > 8:
                buf = buf[-3:]  # no frame in here: keep what could start one


def parse_a02(buf, no_target=None):
    """Last valid frame in buf (resynchronising on 0xFF), distance in mm; None if none.
    A frame of 0 is the sensor's own "no target": returned as no_target."""
    found = None
    i = 0
    n = len(buf)
    while i + 4 <= n:
        if buf[i] == 0xFF and (0xFF + buf[i + 1] + buf[i + 2]) & 0xFF == buf[i + 3]:
            found = buf[i + 1] * 256 + buf[i + 2]
            i += 4
        else:
            i += 1
    if found == 0:
        return no_target
    return found


def make(hw, cfg):
    kind = cfg["sensor"]
    if kind == "a02yyuw":
        return A02yyuw(hw, cfg["sensor_uart"])
    if kind in ("jsn-sr04t", "hc-sr04"):
        return EchoSensor(hw, cfg["trig_pin"], cfg["echo_pin"], cfg["max_mm"])
    raise ValueError("unknown sensor %s" % kind)
