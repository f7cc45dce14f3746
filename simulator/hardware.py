"""The firmware's hardware module, simulated: the same functions as firmware/binlink/hw.py,
backed by the physics of one bin. The firmware calls it exactly as it calls the real one.

Energy: time awake and time on air are accounted so the simulation knows the battery drain."""
import re

from binlink.wire import framing
from binlink.sim.energy import ACTIVE_MA, BOOT_MS, TX_MA
_AT_SEND = re.compile(rb"AT\+SEND=(\d+),(\d+),([0-9A-Fa-f]*)\r\n")


class SimHardware:
    def __init__(self, bin_model, sensor, weather, battery, radio_port, sensor_port, transmit, clock):
        """transmit(payload, on_air_len) -> bool is the radio: True when it left the module.
        clock() -> simulated seconds."""
        self.bin = bin_model
        self.sensor = sensor
        self.weather = weather
        self.battery = battery
        self.radio_port = tuple(radio_port)
        self.sensor_port = tuple(sensor_port)
        self.transmit = transmit
        self.clock = clock
        self.rtc = b""
        self.nvs = {}
        self.cause = 1  # power on
        self.awake_ms = 0.0
        self.tilted = False
        self.tilt_pin = 33
        self.pins = {}  # output pin levels the firmware set (radio mode pins, sensor power)
        self.hot_c = None  # temperature inside the bin when something smoulders
        self.module_down = False  # RYLR998 answering +ERR (or nothing): a transport outage
        self._rx = b""  # bytes the module/sensor has for the firmware to read
        self.last_true = None  # (true fill %, true surface mm) at the last ping
        self.sleep_ms_requested = None
        self.wdt_ms = None

    # time and sleep ---------------------------------------------------------------------------
    def reset_cause(self):
        return self.cause

    def time_s(self):
        return int(self.clock())

    def sleep_ms(self, ms):
        self.awake_ms += ms

    def deepsleep(self, ms):
        self.sleep_ms_requested = ms

    def wake_on_pin(self, pin, level):
        pass

    # persistent memory ------------------------------------------------------------------------
    def rtc_read(self):
        return self.rtc

    def rtc_write(self, data):
        if len(data) > 2048:
            raise OSError("RTC memory holds 2048 bytes, got %d" % len(data))
        self.rtc = bytes(data)

    def nvs_get(self, key):
        return self.nvs.get(key)

    def nvs_set(self, key, value):
        if not -(2**31) <= value < 2**31:
            raise OSError("NVS i32 out of range")
        self.nvs[key] = value

    def power_loss(self):
        """Battery swap or brown-out: RTC memory is gone, NVS stays."""
        self.rtc = b""
        self.cause = 1

    # pins, sensors -----------------------------------------------------------------------------
    def pin_write(self, pin, value):
        self.pins[pin] = value
        self.awake_ms += 0.01

    def pin_read(self, pin):
        if pin == self.tilt_pin:
            return 0 if self.tilted else 1
        return 1  # the radio's AUX: idle (the simulated module finishes instantly)

    def air_c(self):
        return self.weather.air_c(self.clock())

    def pulse_us(self, trig, echo, timeout_us):
        surface = self.bin.surface_mm()
        self.last_true = (self.bin.true_fill_pct(), surface)
        us = self.sensor.echo_us(surface, self.air_c(), timeout_us)
        self.awake_ms += (timeout_us if us < 0 else us) / 1000.0
        return us

    def battery_mv(self, pin):
        return self.battery.mv()

    def temperature_c(self, pin, bits=9):
        self.awake_ms += (750 >> (12 - bits)) + 5  # DS18B20 conversion time at that resolution
        step = 0.5 / (1 << (bits - 9))
        t = self.hot_c if self.hot_c is not None else self.air_c() + self.sensor.rng.gauss(0, 0.2)
        return round(t / step) * step

    def wdt_start(self, timeout_ms):
        self.wdt_ms = timeout_ms

    def wdt_feed(self):
        pass

    # UARTs: the sensor (A02YYUW) and the radio module ----------------------------------------
    def uart_flush_input(self, port):
        self._rx = b""

    def uart_read(self, port, n, timeout_ms):
        if tuple(port) == self.sensor_port:
            surface = self.bin.surface_mm()
            self.last_true = (self.bin.true_fill_pct(), surface)
            self.awake_ms += 100
            data = self.sensor.a02_frame(surface, self.air_c()) * ((n + 3) // 4)
            return data[:n]
        out, self._rx = self._rx[:n], self._rx[n:]
        self.awake_ms += 30 if out else timeout_ms
        return out

    def uart_write(self, port, data):
        data = bytes(data)
        m = _AT_SEND.match(data)
        if m:  # RYLR998: the module sends the ASCII data and answers
            payload = m.group(3)
            if self.module_down:
                self._rx += b"+ERR=12\r\n"
                return
            ok = self.transmit(bytes.fromhex(payload.decode()), len(payload))
            self._rx += b"+OK\r\n" if ok else b"+ERR=12\r\n"
            return
        self.transmit(data, len(data))  # transparent module / wire: bytes as written

    # Wi-Fi -------------------------------------------------------------------------------------
    def wifi_connect(self, ssid, password, timeout_ms):
        return not self.module_down

    def wifi_off(self):
        pass

    def mqtt_publish(self, client_id, host, port, user, password, topic, payload):
        if self.module_down or not self.transmit(bytes(payload), 0):
            raise OSError("broker unreachable")

    # energy -------------------------------------------------------------------------------------
    def charge_cycle(self, tx_ms):
        self.battery.draw(ACTIVE_MA, (self.awake_ms + BOOT_MS) / 1000.0)
        self.battery.draw(TX_MA, tx_ms / 1000.0)


def frames_in(data):
    """Protocol frames inside bytes a firmware wrote (framed for the UART, or bare for RYLR)."""
    if data[:1] == b"\x00":
        return [b for kind, b, _ in framing.Deframer().feed(data) if kind == "frame"]
    return [bytes(data)]
