"""Battery life from the part models' average current (docs/energy.md states every figure).

The current itself is not assumed here: the bench runs the firmware on the board models
(simulator/parts: ESP32, radio, sensors, regulator, divider) through whole wake/sleep cycles and
divides the charge by the time. This module turns that current into years of a real cell."""
CAPACITY_MAH = 19000.0  # one Li-SOCl2 bobbin D cell (Saft LS 33600: 17 Ah at 20 °C to 2 V; 19 Ah nominal)
COLD_USABLE = 0.7  # share of it a bin sees over winters down to -20 °C (LS 33600 capacity-vs-temperature curve)
SELF_DISCHARGE_PER_YEAR = 0.015  # bobbin Li-SOCl2 at +20 °C: 1-2 %/year (~33 uA equivalent for 19 Ah)
HOURS_PER_YEAR = 8766.0


def self_discharge_ma():
    return CAPACITY_MAH * SELF_DISCHARGE_PER_YEAR / HOURS_PER_YEAR


def battery_years(average_ma):
    """Years until the usable capacity is gone at this average draw (self-discharge added)."""
    return CAPACITY_MAH * COLD_USABLE / (average_ma + self_discharge_ma()) / HOURS_PER_YEAR
