# `machine` on the simulated board (the subset binlink uses), with the ESP32 port's constants
# (ports/esp32/modmachine.c, machine_pin.c). Each call is forwarded to the host's ESP32 model.
from _host import call

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5
PIN_WAKE = EXT0_WAKE = 2
EXT1_WAKE = 3
TIMER_WAKE = 4


def reset_cause():
    return call("reset_cause")


def wake_reason():
    return call("wake_reason")


def deepsleep(ms=0):
    call("deepsleep", ms)


def lightsleep(ms=0):
    call("lightsleep", ms)


def reset():
    call("reset")


def time_pulse_us(pin, level, timeout_us=1000000):
    return call("time_pulse_us", pin.id, level, timeout_us)


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_UP = 2
    PULL_DOWN = 1

    def __init__(self, id, mode=None, pull=-1, value=None, hold=None):
        self.id = id
        if mode is not None or pull != -1 or value is not None or hold is not None:
            self.init(mode, pull, value=value, hold=hold)

    def init(self, mode=None, pull=-1, value=None, hold=None):
        call("pin_init", self.id, mode, pull, value, hold)

    def value(self, v=None):
        if v is None:
            return call("pin_value", self.id)
        call("pin_set", self.id, 1 if v else 0)

    def __call__(self, v=None):
        return self.value(v)

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)


class UART:
    def __init__(self, id, baudrate=115200, tx=None, rx=None, timeout=0, rxbuf=256, **kw):
        self.id = id
        call("uart_init", id, baudrate, tx, rx, timeout, rxbuf)

    def init(self, baudrate=115200, tx=None, rx=None, timeout=0, rxbuf=256, **kw):
        call("uart_init", self.id, baudrate, tx, rx, timeout, rxbuf)

    def write(self, buf):
        call("uart_write", self.id, bytes(buf).hex())
        return len(buf)

    def read(self, n=-1):
        r = call("uart_read", self.id, n)
        return bytes.fromhex(r) if r else None

    def any(self):
        return call("uart_any", self.id)

    def flush(self):
        call("uart_flush", self.id)

    def txdone(self):
        return call("uart_txdone", self.id)

    def deinit(self):
        call("uart_deinit", self.id)


class ADC:
    ATTN_0DB = 0
    ATTN_2_5DB = 1
    ATTN_6DB = 2
    ATTN_11DB = 3

    def __init__(self, pin, atten=0):
        self.pin = pin.id
        self.atten = atten

    def read_uv(self):
        return call("adc_read_uv", self.pin, self.atten)


class RTC:
    def memory(self, data=None):
        if data is None:
            return bytes.fromhex(call("rtc_memory"))
        call("rtc_memory_write", bytes(data).hex())


class WDT:
    def __init__(self, id=0, timeout=5000):
        call("wdt_init", timeout)

    def feed(self):
        call("wdt_feed")
