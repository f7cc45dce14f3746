"""The battery-life range (simulator/energy.py, docs/energy.md) from the part models: issue 19."""
from binlink.sim import energy
from tests import bench_energy


def test_battery_life_is_a_range_around_a_central_figure_of_9_to_15_years():
    """A day of the default config on the custom board, the firmware's imports added (12 modules
    on a wake that only measures, 15 on one that reports, as counted on the VM by the bench)."""
    years, awake, tx_left, sim_ma = bench_energy.battery({"measure": 12, "report": 15})
    assert years["low"] < years["central"] < years["high"]
    assert 9.0 <= years["central"] <= 15.0, years
    assert 0.05 < sim_ma < 0.1  # tens of microamps: the sleeping board plus four wakes an hour
    assert awake["measure"] < awake["report"] < 1500.0
    assert tx_left > 100.0  # the chip sleeps while the E22 still sends (its fast sleep)


def test_what_a_wake_costs_follows_the_cases_inputs():
    wakes = [(1100.0, 12)] * 4  # an hour of wakes that only measure
    low, central, high = (energy.average_ma(0.07, wakes, 1.0, case) for case in ("low", "central", "high"))
    assert low > central > high
    frozen = energy.average_ma(0.07, wakes, 1.0, boot_ms=energy.FROZEN_BOOT_MS, import_ms=0.0)
    assert frozen < central - 0.02  # ~0.6 s less at ~40 mA, four times an hour: ~28 uA
    assert energy.battery_years(central) > energy.battery_years(low, "low")
