"""Ultrasonic sensors and the DS18B20, electrically (timing, power, faults). What the sound
does in the bin — echo time for a surface through air at T, stray echoes, blind zone — comes
from binlink.sim.physics.UltrasonicSensor.

JSN-SR04T (v3 datasheet) / HC-SR04 (Elecfreaks datasheet): a trigger pulse of >= 20 us (JSN-SR04T:
the vendor's note; a shorter one is ignored) / >= 10 us (HC-SR04) starts a burst; echo goes high when the burst is out and stays high for the round trip. With no echo it
stays high ~60 ms (JSN-SR04T; HC-SR04 ~38 ms). Blind zone ~25 cm (JSN) / 2 cm (HC-SR04). Needs
~100 ms after power-up before it answers a trigger. Current: JSN-SR04T ~5 mA standing by, ~8 mA
measuring; HC-SR04 ~2 mA / 15 mA.

A02YYUW (DFRobot SEN0311 wiki): 9600 8N1, frame 0xFF H L SUM. RX pin high or floating: processed
value, one frame every 100-300 ms; RX low: real-time value, every ~100 ms. Streams on its own
whether or not anyone reads. Current <= 8 mA.

DS18B20 (Maxim datasheet): conversion 93.75/187.5/375/750 ms at 9/10/11/12 bits; the scratchpad
keeps the previous value until a conversion completes, and holds +85.0 °C after power-on;
byte 8 is the Dallas CRC8 of bytes 0-7. Standby ~1 uA, converting ~1.5 mA."""


CONVERSION_MS = {9: 93.75, 10: 187.5, 11: 375.0, 12: 750.0}


def _crc8_bits(data):
    crc = 0
    for b in data:
        for _ in range(8):
            mix = (crc ^ b) & 1
            crc >>= 1
            if mix:
                crc ^= 0x8C
            b >>= 1
    return crc


_CRC8 = bytes(_crc8_bits([i]) for i in range(256))  # the shift register over one byte from each state


def crc8(data):
    """The Dallas/Maxim CRC8 (x^8 + x^5 + x^4 + 1, LSB first), a byte at a time."""
    crc = 0
    for b in data:
        crc = _CRC8[crc ^ b]
    return crc


class EchoSensor:
    TRIGGER_MS = 0.020  # JSN-SR04T: 20 us
    NO_ECHO_MS = 60.0
    IDLE_STEP = True  # step() has nothing to do: the pulse is fixed at the trigger (the board skips it)
    BURST_MS = 0.5  # trigger fall to echo rise: the 40 kHz burst goes out
    POWER_UP_MS = 100.0
    IDLE_MA, ACTIVE_MA = 5.0, 8.0
    EVENTS_CACHED = True  # the board may keep next_event() until touched() (parts/board.py, Board._next_stop)

    def touched(self):
        """What next_event() answers may have changed (the board sets its own: it keeps the answer)."""

    def __init__(self, acoustics, surface_mm, air_c, trig, echo):
        self.acoustics = acoustics  # physics.UltrasonicSensor
        self.surface_mm = surface_mm  # () -> mm
        self.air_c = air_c  # () -> °C
        self.trig, self.echo = trig, echo
        self.powered_at = None
        self.trig_high_at = None
        self.high = None  # (rise ms, fall ms) of the current echo pulse
        self.pings = []  # (ms, surface mm) truth at each ping

    def power(self, on, now):
        self.powered_at = now if on else None

    def on_pin(self, pin, level, now):
        """True when what it draws changed: the trigger's fall started a ping (the board recounts)."""
        if pin != self.trig or self.powered_at is None:
            return False
        if level:
            self.trig_high_at = now
        elif self.trig_high_at is not None:
            wide = now - self.trig_high_at >= self.TRIGGER_MS - 1e-9
            ready = now - self.powered_at >= self.POWER_UP_MS
            busy = self.high is not None and now < self.high[1]
            self.trig_high_at = None
            if wide and ready and not busy:
                surface = self.surface_mm()
                self.pings.append((now, surface))
                us = self.acoustics.echo_us(surface, self.air_c(), 10**6)
                width = self.NO_ECHO_MS if us < 0 else us / 1000.0
                rise = now + self.BURST_MS
                self.high = (rise, rise + width)
                self.touched()
                return True
        return False

    def pulse(self, now):
        return self.high

    def current_ma(self, now):
        if self.powered_at is None:
            return 0.0
        return self.ACTIVE_MA if self.high is not None and now < self.high[1] else self.IDLE_MA

    def next_event(self, now):
        return self.high[1] if self.high is not None and now < self.high[1] else None  # back to idle current

    current_until = next_event  # when what it draws changes by itself (the board's _recount)

    def step(self, now):
        pass


class HcSr04(EchoSensor):
    TRIGGER_MS = 0.010
    NO_ECHO_MS = 38.0
    POWER_UP_MS = 50.0
    IDLE_MA, ACTIVE_MA = 2.0, 15.0


class A02yyuw:
    CURRENT_MA = 8.0

    def __init__(self, acoustics, surface_mm, air_c, rx_pin, rng):
        self.acoustics = acoustics
        self.surface_mm = surface_mm
        self.air_c = air_c
        self.rx_pin = rx_pin
        self.rng = rng
        self.powered_at = None
        self.next_frame = None
        self.rx_level = None
        self.deliver = None
        self.listening = lambda: False  # is the ESP32's UART open (else nothing needs simulating)
        self.frames = []  # (ms, surface mm)

    def power(self, on, now):
        self.powered_at = now if on else None
        self.next_frame = None

    def on_pin(self, pin, level, now):
        if pin == self.rx_pin:
            self.rx_level = level

    def _interval(self):
        if self.rx_level == 0:
            return 100.0
        return self.rng.uniform(100.0, 300.0)

    def next_event(self, now):
        if self.powered_at is None or not self.listening():
            return None
        if self.next_frame is None or self.next_frame < now - 1000.0:
            self.next_frame = now + self.rng.uniform(0.0, self._interval())
        return self.next_frame

    def step(self, now):
        while self.powered_at is not None and self.listening() and self.next_frame is not None \
                and self.next_frame <= now:
            surface = self.surface_mm()
            self.frames.append((self.next_frame, surface))
            if self.deliver:
                self.deliver(self.acoustics.a02_frame(surface, self.air_c()), self.next_frame, 9600)
            self.next_frame += self._interval()

    def current_ma(self, now):
        return 0.0 if self.powered_at is None else self.CURRENT_MA


class Ds18b20:
    ROM = bytes([0x28, 0xFF, 0x4C, 0x1D, 0x61, 0x16, 0x04])
    EVENTS_CACHED = True  # the board may keep next_event() until touched() (parts/board.py, Board._next_stop)

    def touched(self):
        """What next_event() answers may have changed (the board sets its own: it keeps the answer)."""

    def __init__(self, temperature_c):
        self.temperature_c = temperature_c  # () -> °C at the sensor
        self.rom = self.ROM + bytes([crc8(self.ROM)])
        self.absent = False  # fault: not wired / broken: no presence pulse
        self.crc_errors = 0  # fault: the next N scratchpad reads arrive corrupted (noise on the bus)
        self.lose_conversions = 0  # fault: the next N Convert T commands are lost on the bus
        self.power_on()

    def power_on(self):
        self.scratch = bytearray([0x50, 0x05, 0x4B, 0x46, 0x7F, 0xFF, 0x0C, 0x10, 0])  # +85.0 °C, 12 bits
        self.converting = None  # (done at ms, raw value)
        self.touched()

    def bits(self):
        return 9 + ((self.scratch[4] >> 5) & 3)

    def present(self):
        return not self.absent

    def convert(self, now):
        if self.lose_conversions:
            self.lose_conversions -= 1
            return
        step = 1 << (12 - self.bits())
        raw = int(round(self.temperature_c() * 16)) // step * step
        self.converting = (now + CONVERSION_MS[self.bits()], raw & 0xFFFF)
        self.touched()

    def read_scratch(self, now):
        self._finish(now)
        data = bytearray(self.scratch[:8])
        out = data + bytes([crc8(data)])
        if self.crc_errors:
            self.crc_errors -= 1
            out[0] ^= 0x10
        return bytes(out)

    def write_scratch(self, data):
        self.scratch[2:5] = data[:3]

    def _finish(self, now):
        if self.converting and now >= self.converting[0]:
            raw = self.converting[1]
            self.scratch[0], self.scratch[1] = raw & 0xFF, raw >> 8
            self.converting = None
            self.touched()

    def current_ma(self, now):
        return 1.5 if self.converting and now < self.converting[0] else 0.001

    def next_event(self, now):
        return self.converting[0] if self.converting else None  # due, or overdue: step() finishes it

    current_until = next_event  # when what it draws changes by itself (the board's _recount)

    def step(self, now):
        """True when a conversion completed (the current falls to standby)."""
        if self.converting and now >= self.converting[0]:
            self._finish(now)
            return True
        return False
