"""Battery life from what the part models measured, as a low / central / high range
(docs/energy.md states every input with its source; ASSUMED where none was found).

The charge itself is not assumed here: the bench runs the firmware on the board models
(simulator/parts: ESP32, radio, sensors, regulator, cell) through whole wake/sleep cycles and
measures each kind of wake (awake time, charge) and the sleeping board's current. This module
adds what the simulation does not run (the firmware's module imports: the board models the chip
up to main.py), swaps the central inputs for the low / high ones, and turns the average current
into years of a real cell."""
from binlink.sim.parts import cell, esp32

HOURS_PER_YEAR = 8766.0
CAPACITY_MAH = cell.CAPACITY_MAH  # Saft LS 33600: 17 Ah at +20 degC to 2.0 V

# (low, central, high): low is the pessimistic end (fewer years), high the optimistic one
INPUTS = {
    # share of the capacity a bin in the open gets: winters down to -20 degC and ~100 mA pulses
    # (Linden's Handbook of Batteries fig. 14.17a: a D bobbin cell gives 13.5 Ah at 20 mA, 17-19
    # at 0.2-4 mA; the temperature share ASSUMED)
    "usable": (0.6, 0.7, 0.8),
    # self-discharge per year at +20 degC (Saft LS 26500, the same bobbin family: "less than 1 %
    # after 1 year of storage"; Saft/Tadiran quote 1-2 % for years in warm service)
    "self_discharge": (0.02, 0.01, 0.007),
    # ROM + bootloader + MicroPython + filesystem + boot.py, to main.py (glenn20, measured on an
    # ESP32-S3: 635 ms; the ESP32's own figure +/- 10 % ASSUMED)
    "boot_ms": (esp32.BOOT_MS * 1.1, esp32.BOOT_MS, esp32.BOOT_MS * 0.9),
    # one firmware module imported from a .mpy on the filesystem (ASSUMED: no published figure)
    "import_ms": (10.0, 5.0, 2.0),
    # ESP32 awake at 160 MHz, RF off (ESP32 datasheet: 27-44 mA at 160 MHz; flash reads ASSUMED on top)
    "esp_ma": (50.0, esp32.ACTIVE_MA, 30.0),
    # ESP32 deep sleep with RTC timer and memory (datasheet 10 uA; a module's flash and pads ASSUMED up to 25)
    "esp_sleep_ua": (25.0, esp32.DEEP_SLEEP_MA * 1000, 10.0),
}


def pick(name, case):
    return INPUTS[name][("low", "central", "high").index(case)]


def self_discharge_ma(case="central"):
    return CAPACITY_MAH * pick("self_discharge", case) / HOURS_PER_YEAR


def battery_years(average_ma, case="central"):
    """Years until the usable capacity is gone at this average draw (self-discharge added)."""
    return CAPACITY_MAH * pick("usable", case) / (average_ma + self_discharge_ma(case)) / HOURS_PER_YEAR


def average_ma(sim_ma, wakes, hours, case="central", boot_ms=None, import_ms=None):
    """sim_ma: the simulated board's average current over `hours` (the chip modelled to main.py at
    the central inputs, imports not run); wakes: (awake ms, firmware modules imported) of every
    wake in that time. Returns the average current with the case's inputs and the imports
    (boot_ms / import_ms: another image, e.g. a frozen one, instead of the case's)."""
    esp = pick("esp_ma", case)
    boot = pick("boot_ms", case) if boot_ms is None else boot_ms
    per_module = pick("import_ms", case) if import_ms is None else import_ms
    extra_mams = 0.0  # mA x ms
    for ms, modules in wakes:
        chip_ms = ms - esp32.BOOT_MS + boot + modules * per_module
        extra_mams += chip_ms * esp - ms * esp32.ACTIVE_MA
    asleep = (pick("esp_sleep_ua", case) - esp32.DEEP_SLEEP_MA * 1000.0) / 1000.0
    return sim_ma + extra_mams / 1000.0 / (hours * 3600.0) + asleep


# A frozen image (the firmware built into MicroPython's own _boot.py, no filesystem mount, no
# image validation after deep sleep): glenn20 measured 70 ms from wake back to deep sleep on an ESP32
FROZEN_BOOT_MS = 70.0


def years_range(sim_ma, wakes, hours):
    return {case: battery_years(average_ma(sim_ma, wakes, hours, case), case) for case in ("low", "central", "high")}
