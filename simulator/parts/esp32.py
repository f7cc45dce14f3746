"""The ESP32 running MicroPython, as the firmware sees it through machine/esp32 (ports/esp32).

- RTC user memory (machine_rtc.c, RTC_NOINIT_ATTR): survives deep sleep, watchdog and brown-out
  resets; gone after a power loss.
- NVS (esp32_nvs.c): survives everything once committed; an uncommitted write dies with a reset.
- Watchdog (machine_wdt.c, the task WDT): minimum 1 s, no deinit — it cannot be stopped, and a soft
  reset leaves it running; it bites when not fed in time.
- Pins (machine_pin.c): Pin(..., hold=True) latches the pad; a held pad ignores value() until
  re-initialised (init always drops the hold, applies the new config, re-holds if asked). In deep
  sleep every pad that is not held stops driving (high impedance), and so does a held pad outside
  the RTC domain: the digital pads' hold needs esp32.gpio_deep_sleep_hold(True), which the
  firmware never calls (ESP32 datasheet, table "RTC IO"; ESP-IDF gpio_deep_sleep_hold_en).
- Reset causes (modmachine.c): brown-out reports PWRON_RESET; deep-sleep wake DEEPSLEEP_RESET.
- UARTs: bytes take 10 bit-times each at the configured baud; write() returns once queued, flush()
  waits until the last bit is out; the receive buffer holds rxbuf bytes and drops what overflows.
- Supply current per state (ESP32 datasheet v4, section 5.5 / table "Power consumption by power
  modes"): CPU at 160 MHz with RF off ~40 mA; Wi-Fi TX bursts ~240 mA; deep sleep with RTC
  timer and RTC memory 10 uA."""
PWRON, HARD, WDT, DEEPSLEEP, SOFT = 1, 2, 3, 4, 5
WAKE_EXT0, WAKE_TIMER = 2, 4
RTC_BYTES = 2048
RTC_PADS = frozenset((0, 2, 4, 12, 13, 14, 15, 25, 26, 27, 32, 33, 34, 35, 36, 37, 38, 39))  # ESP32 datasheet, RTC_GPIO0-17
ACTIVE_MA = 40.0
WIFI_MA = 120.0  # average while associating / exchanging (RX ~100 mA, TX bursts ~240 mA)
DEEP_SLEEP_MA = 0.010
LIGHT_SLEEP_MA = 0.8  # datasheet table "Power consumption by power modes": Light-sleep 0.8 mA
LIGHT_WAKE_MS = 1.0  # light sleep to running code again (ESP-IDF sleep_modes: well under 1 ms plus the interpreter)
# Wake to the first line of main.py, measured by glenn20/upy-esp32-experiments
# "OptimisingMicropythonBootTime" (stock MicroPython v1.19.1-660, on an ESP32-S3 FeatherS3; no such
# split is published for the plain ESP32): ROM + 2nd-stage bootloader + image validation (217 ms of
# it) to app_main() 264 ms; nvs_flash_init 7.8 + gc_init 12.5 + app_main to _boot.py 0.8 ms;
# _boot.py (filesystem mount), boot.py and a trivial main.py to its deepsleep() 350 ms: 635 ms.
# The firmware's own imports come on top (simulator/energy.py, IMPORT_MS).
ROM_BOOTLOADER_MS = 264.0
MPY_INIT_MS = 7.8 + 12.5 + 0.8
FS_BOOT_PY_MS = 350.0
BOOT_MS = ROM_BOOTLOADER_MS + MPY_INIT_MS + FS_BOOT_PY_MS
CALL_MS = 0.02  # interpreter time around one hardware call
# The RTC in deep sleep counts on the internal 150 kHz RC oscillator (RTC_SLOW_CLK's default
# source): ESP-IDF "System Time" says its frequency stability is affected by temperature, so time
# drifts in deep and light sleep; calibrated against the crystal at boot, it still runs fast
# asleep. Measured: 33-38 s gained an hour, each module its own, hour-long sleeps of one module
# within 5 s of each other (moonlight-systems.co.uk code example 6, four Adafruit HUZZAH32); 35 s
# in 2 h on the internal RC (esp32.com forum, topic 1175). docs/hardware.md.
RTC_SLOW_FAST = (0.0049, 0.0106)  # how much faster than true time a module's RTC counts asleep (per unit)
RTC_SLOW_JITTER = 0.0007  # from one sleep to the next (5 s in an hour, as two sigma)
# A board may put a 32.768 kHz crystal on 32K_XP/32K_XN (GPIO32/33) and build MicroPython with
# CONFIG_RTC_CLK_SRC_EXT_CRYS: ESP-IDF "System Time" gives it better frequency stability for ~1 uA
# more in deep sleep. A tuning-fork crystal (TF20 series datasheet): +-20 ppm at 25 degC, and slower
# on either side of its turnover temperature (25 +- 5 degC) by 0.030 +- 0.01 ppm/degC^2 (a parabola;
# Microchip's "Temperature Tolerance" note for 32 kHz crystals says the same).
XTAL32K_TOLERANCE = 20e-6
XTAL32K_TURNOVER_C = (20.0, 30.0)
XTAL32K_COEFF = (0.020e-6, 0.040e-6)


class RcSlow:
    """The RTC on the internal 150 kHz RC oscillator: this unit's rate (a fraction: 0.01 counts 36 s
    too many an hour), and the jitter from one sleep to the next."""

    def __init__(self, rng):
        self.rate = rng.uniform(*RTC_SLOW_FAST)
        self.rng = rng

    def slept_s(self, counted_s, air_c):
        """True seconds a deep sleep of counted_s RTC seconds lasts (air_c: no effect modelled)."""
        return counted_s / (1.0 + self.rate + self.rng.gauss(0.0, RTC_SLOW_JITTER / 2))


class Xtal32k:
    """The RTC on an external 32.768 kHz crystal: this unit's rate at its turnover temperature,
    slower by the parabola away from it (the air the bin sleeps in)."""

    def __init__(self, rng):
        self.rate = rng.uniform(-XTAL32K_TOLERANCE, XTAL32K_TOLERANCE)
        self.turnover_c = rng.uniform(*XTAL32K_TURNOVER_C)
        self.coeff = rng.uniform(*XTAL32K_COEFF)

    def slept_s(self, counted_s, air_c):
        return counted_s / (1.0 + self.rate - self.coeff * (air_c - self.turnover_c) ** 2)


RTC_CLOCKS = {"rc": RcSlow, "xtal32k": Xtal32k}


class Stop(Exception):
    """Raised inside the board when execution ends: deep sleep or a reset of `kind`."""

    def __init__(self, kind):
        Exception.__init__(self, kind)
        self.kind = kind


class Uart:
    def __init__(self, uid):
        self.uid = uid
        self.baud = 115200
        self.rxbuf = 256
        self.rx = []  # [arrival ms, byte] in arrival order
        self.tx_done_ms = 0.0
        self.dropped = 0

    def byte_ms(self, baud=None):
        return 10000.0 / (baud or self.baud)


class Esp32:
    def __init__(self):
        self.now_ms = 0.0
        self.rtc = b""
        self.nvs = {}  # committed (namespace, key) -> int
        self.nvs_pending = {}
        self.wdt_timeout = None
        self.wdt_due = None
        self.cause = PWRON
        self.wake = 0
        self.wake_ext0 = None
        self.pins = {}  # pin -> {"out": bool, "level": 0/1, "pull": None/"up"/"down", "hold": bool}
        self.uarts = {}
        self.asleep = False
        self.light = False  # in light sleep (machine.lightsleep)
        self.wifi_on = False

    # pins ---------------------------------------------------------------------------------------
    def pad(self, pin):
        """What a part wired to the pin sees: 0/1 when driven, None when floating."""
        p = self.pins.get(pin)
        if p is None or not p["out"] or (self.asleep and not (p["hold"] and pin in RTC_PADS)):
            return None
        return p["level"]

    def pin_init(self, pin, mode, pull, value, hold):
        p = self.pins.get(pin)
        if p is None:
            p = self.pins[pin] = {"out": False, "level": 0, "pull": None, "hold": False, "reg": 0}
        if mode is not None:
            p["out"] = mode in (3, 7)
        if pull != -1:
            p["pull"] = {2: "up", 1: "down"}.get(pull)
        if value is not None:
            p["reg"] = 1 if value else 0
        if hold is not None:  # machine_pin.c: drop the hold, apply the config, re-hold if asked
            p["hold"] = bool(hold)
        if not p["hold"] or hold is not None:
            p["level"] = p["reg"]

    def pin_set(self, pin, value):
        p = self.pins.get(pin)
        if p is None:
            p = self.pins[pin] = {"out": False, "level": 0, "pull": None, "hold": False, "reg": 0}
        p["reg"] = value
        if not p["hold"]:
            p["level"] = value

    def boot(self, cause):
        """Chip reset: pads not held return to inputs; the WDT stops except after a soft reset."""
        self.cause = cause
        self.asleep = False
        self.uarts = {}
        self.wifi_on = False
        self.nvs_pending = {}
        if cause != SOFT:
            self.wdt_timeout = self.wdt_due = None
        for pin, p in list(self.pins.items()):
            if not p["hold"]:
                del self.pins[pin]
        if cause == PWRON:
            self.wake = 0

    def power_loss(self):
        self.rtc = b""
        self.pins = {}
        self.boot(PWRON)
