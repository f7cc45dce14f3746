"""Battery life from the energy model in docs/energy.md (every figure is stated there)."""
BOOT_MS = 250.0  # MicroPython start after deep sleep, before main.py runs
ACTIVE_MA = 45.0  # ESP32 at 160 MHz, radio module idle, sensor powered
TX_MA = 120.0  # EBYTE E22-900T22 transmitting at 22 dBm
SLEEP_UA = 20.0  # ESP32 deep sleep 10 uA + E22 sleep 2 uA + divider and regulator leakage
CAPACITY_MAH = 19000.0  # one Li-SOCl2 D cell (e.g. Saft LS33600)
USABLE = 0.8  # derating for cold, passivation and self-discharge over the years
SELF_DISCHARGE_PER_YEAR = 0.01  # of capacity, Li-SOCl2 at 20 °C
HOURS_PER_YEAR = 8766.0


def battery_years(awake_ms_per_wake, wakes_per_hour, tx_ms_per_hour):
    awake_s = (BOOT_MS + awake_ms_per_wake) / 1000.0 * wakes_per_hour
    mah_per_hour = ((ACTIVE_MA * awake_s + TX_MA * tx_ms_per_hour / 1000.0) / 3600.0 + SLEEP_UA / 1000.0
                    + CAPACITY_MAH * SELF_DISCHARGE_PER_YEAR / HOURS_PER_YEAR)
    return CAPACITY_MAH * USABLE / mah_per_hour / HOURS_PER_YEAR
