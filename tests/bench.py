"""`make bench`: measures speed and size, merges the figures into build/bench.json.

Each section is a function returning a dict of keys; ratios are measured side by side in one run.
`python -m tests.bench codec gateway` runs only the named sections."""
import json
import os
import sys
import time

from binlink.wire import codec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "build", "bench.json")
KEY = bytes(range(16))  # TEST KEY


def bench_codec():
    frames = [codec.encode_reading(KEY, 0xA1, n, 800 + n % 1000, 20, 3700, 0, 5, 5) for n in range(1, 20001)]
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        last = 0
        for f in frames:
            last = codec.decode_body(f, codec.verify(f, KEY, last))["fcnt"]
        best = max(best, len(frames) / (time.perf_counter() - t0))
    return {"bytes_per_reading": len(frames[0]), "decode_frames_per_s": round(best)}


def bench_gateway():
    from tests import bench_gateway

    return bench_gateway.run()


def bench_mqtt():
    """The MQTT client the publisher uses, chosen by this side-by-side measurement (docs/gateway.md)."""
    from tests import bench_mqtt

    return bench_mqtt.run()


def bench_firmware():
    """The default config on the part models (simulator/parts): VM fuel, awake time and charge of a
    normal wake, battery life of both board profiles, the E22's first frame after each wake."""
    import random

    from binlink.wire import airtime
    from binlink.sim import energy
    from binlink.sim.device import SimDevice
    from binlink.sim.vm import FirmwareVM

    def device(profile, vm=None, **kw):
        clock = [1_790_000_000.0]
        d = SimDevice(random.Random(1), 0xA1, KEY, lambda: clock[0], vm=vm, profile=profile, **kw)
        d.clock_ref = clock
        return d

    def cycles(d, n):
        out = []
        for _ in range(n):
            d.clock_ref[0] += d.wake()
            d.bin.advance(d.clock_ref[0])
            out.append((d.hw.awake_ms, d.awake_charge_uAh))
        return out

    vm = FirmwareVM()
    dev = device("custom", vm=vm, report_s=900)  # a report every wake: the cycle that costs most
    per = cycles(dev, 8)[1:]  # the first wake is a cold boot (module check, hello)
    vm.close()
    fuel = sorted(dev.fuel[1:])[len(dev.fuel[1:]) // 2]
    awake_ms = sorted(a for a, _ in per)[len(per) // 2]
    charge = sorted(c for _, c in per)[len(per) // 2]
    years = {}
    for profile in ("custom", "devboard"):  # default config: wake every 15 min, report hourly
        d = device(profile)
        cycles(d, 1)
        used0, t0 = d.battery.used_mah, d.clock_ref[0]
        cycles(d, 96)
        hours = (d.clock_ref[0] - t0) / 3600.0
        years[profile] = energy.battery_years((d.battery.used_mah - used0) / hours)
    d = device("custom", report_s=900)
    ok = 0
    n = 50
    for _ in range(n):  # each wake's first frame: written into a module fresh out of deep sleep
        lost, sent = d.hw.radio.lost_bytes, len(d.hw.radio.packets)
        cycles(d, 1)
        ok += d.hw.radio.lost_bytes == lost and len(d.hw.radio.packets) > sent
    frame_len = 16
    lpp_len = 13 + 15  # LoRaWAN overhead + Cayenne LPP distance, temperature, battery, flags
    return {
        "firmware_fuel_per_cycle": fuel,
        "firmware_awake_ms_per_cycle": round(awake_ms, 1),
        "firmware_charge_uAh_per_cycle": round(charge, 2),
        "battery_years_custom_board": round(years["custom"], 1),
        "battery_years_devboard": round(years["devboard"], 2),
        "radio_first_frame_ok": round(ok / n, 3),
        "airtime_ms_sf7": round(airtime.time_on_air_ms(frame_len, 7), 1),
        "airtime_ms_sf12": round(airtime.time_on_air_ms(frame_len, 12), 1),
        "lorawan_lpp_airtime_ms_sf12": round(airtime.time_on_air_ms(lpp_len, 12), 1),
    }


def bench_fleet():
    """A simulated week of 100 bins with a realistic channel, end to end through the gateway."""
    from binlink.sim import fidelity
    from binlink.sim.fleet import Fleet
    from tests import fleet_run

    t0 = time.perf_counter()
    fleet, events, _, _ = fleet_run.run(100, 7 * 86400, fmt="raw+rssi", seed=7)
    wall = time.perf_counter() - t0
    score = fidelity.score(fleet.truth, None, events, fleet.now)
    # the simulator alone (no pty, no gateway): simulated bin-days per wall second on CPython
    sim = Fleet(100, seed=7)
    t1 = time.perf_counter()
    sim.run(7 * 86400)
    sim_wall = time.perf_counter() - t1
    return {
        "fill_mae_pct": score["fill_mae_pct"],
        "pickup_recall": score["pickup_recall"],
        "pickup_precision": score["pickup_precision"],
        "full_recall": score["full_recall"],
        "full_precision": score["full_precision"],
        "pickups_detectable": score["pickups_detectable"],
        "pickups_total": score["pickups_total"],
        "false_alarms": score["false_alarms"],
        "fleet_week_frames_sent": fleet.frames_sent,
        "fleet_week_lost_on_air": fleet.lost_on_air,
        "fleet_week_end_to_end_wall_s": round(wall, 1),
        "sim_bin_days_per_s": round(100 * 7 / sim_wall, 1),
    }


def bench_planner():
    """A simulated month of 300 bins (after a week of learning), real firmware, honest truth:
    trucks driven by the collection list against fixed weekly rounds; the forecast scored 24 h
    ahead of every true full time in a run where bins are emptied a few hours after full."""
    import random

    from binlink.gateway.forecast import BinForecast
    from binlink.sim import policy

    # the gateway's cost per reading: learn it and forecast full_at (best of three, one core)
    rng = random.Random(1)
    series, t, fill = [], 1_790_000_000.0, 5.0
    for _ in range(20000):
        t += 3600 * rng.uniform(0.95, 1.05)
        fill = 2.0 if fill > 100 else fill + rng.uniform(0, 2)
        series.append((t, fill))
    best = float("inf")
    for _ in range(3):
        f = BinForecast()
        t0 = time.perf_counter()
        for t, fill in series:
            f.update(t, fill)
            f.full_at()
        best = min(best, (time.perf_counter() - t0) / len(series))
    from binlink.gateway import routes

    t0 = time.perf_counter()
    # routes for each counted listed round: 3 trucks of 40 full bins (routes.Trucks), against list order
    c = policy.compare(bins=300, days=30, seed=1, keep_series=0, processes=os.cpu_count() or 1, trucks=routes.Trucks(3, 40.0))
    wall = time.perf_counter() - t0
    return {
        "route_km_saved_pct": c["route_km_saved_pct"],
        "route_km_forecast_month": c["forecast"]["route_km"],
        "route_km_list_order_month": c["forecast"]["route_km_list_order"],
        "hot_spots_forecast": len(c["forecast"]["site"]["hot_spots"]),
        "planner_month_wall_s": round(wall, 1),
        # bin-days run on the firmware (the list's and the scoring run's 300 bins, a week's learning +
        # 30 days each; the fixed run's bins need only the physics: policy._district) per wall second
        "policy_sim_bin_days_per_s": round(2 * 300 * 37 / wall, 1),
        "forecast_us_per_reading": round(best * 1e6, 1),
        "forecast_full_at_mae_h": c["forecast_full_at_mae_h"],
        "forecast_full_at_scored": c["forecast_scored"],
        "collections_saved_pct": c["collections_saved_pct"],
        # the same rounds and margin with each bin's true filling speed instead of the forecast (policy.bound)
        "collections_saved_bound_pct": c["collections_saved_bound_pct"],
        "collections_per_bin_month_fixed": c["fixed"]["collections_per_bin_month"],
        "collections_per_bin_month_forecast": c["forecast"]["collections_per_bin_month"],
        "overflow_bin_hours_fixed": c["overflow_bin_hours_fixed"],
        "overflow_bin_hours_forecast": c["overflow_bin_hours_forecast"],
        # every bin on every round (Monday to Saturday): the most a fixed schedule can do
        "collections_per_bin_month_fixed_every_round": c["collections_per_bin_month_fixed_every_round"],
        "overflow_bin_hours_fixed_every_round": c["overflow_bin_hours_fixed_every_round"],
    }


def bench_planner_page(bins=300):
    """planner_page_bins: the bins a real headless Chromium saw on the planner's page for a site of
    `bins` bins (tests/test_planner_page.py; skipped without playwright and a Chromium)."""
    import tempfile

    from binlink.sim.broker import Mosquitto
    from tests import test_planner_page as pp

    if pp._playwright() is None or pp.browser_path() is None:
        return {}
    b = Mosquitto().start()
    try:
        with tempfile.TemporaryDirectory() as d:
            drawn, routes, updated = pp.page_run(b.port, d, bins)
    finally:
        b.stop()
    return {"planner_page_bins": len(drawn), "planner_page_updates": updated}


def bench_city(bins=1000, days=30):
    """`binlink sim --report --bins 1000 --days 30` as a city would run it, timed end to end (goal:
    five minutes on two cores). Long: its own section, not part of `planner`."""
    import subprocess
    import tempfile

    from binlink.sim import policy

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "binlink"), "sim", "--report", os.path.join(d, "r.html"),
                            "--bins", str(bins), "--days", str(days)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError("binlink sim --report failed: %s" % r.stderr[-2000:])
    return {"sim_report_%d_bins_%d_days_s" % (bins, days): round(wall, 1),
            # bin-days run on the firmware: the list's run and the scoring run (policy.SCORED_BINS)
            "sim_report_bin_days_per_s": round((bins + min(bins, policy.SCORED_BINS)) * (days + 7) / wall, 1)}


def bench_multi_gateway():
    from tests import bench_multi_gateway

    return bench_multi_gateway.run()


def bench_state():
    """Radio replug gap, replays after a state loss, storage written per reading (tests/bench_state.py)."""
    from tests import bench_state

    return bench_state.run()


def bench_trust():
    """Poisoned retained states, a re-key through restarts (tests/bench_recovery.py), resync under
    forgery and the memory it holds (tests/bench_resync.py)."""
    from tests import bench_recovery, bench_resync

    return {**bench_recovery.run(), **bench_resync.run()}


SECTIONS = {"codec": bench_codec, "firmware": bench_firmware, "mqtt": bench_mqtt, "gateway": bench_gateway, "fleet": bench_fleet,
            "multi_gateway": bench_multi_gateway, "state": bench_state, "trust": bench_trust,
            "planner": bench_planner, "start": lambda: __import__("tests.bench_start").bench_start.run()}
SECTIONS["city"] = bench_city  # issue 21: the simulated report at city scale (long: not in `planner`)
SECTIONS["planner_page"] = bench_planner_page  # issue 21: the planner's page in a headless browser
SECTIONS["energy"] = lambda: __import__("tests.bench_energy", fromlist=["run"]).run()  # issue 19: battery range, boot, faults, cold cell
SECTIONS["downlink_fleet"] = lambda: __import__("tests.bench_downlink_fleet", fromlist=["run"]).run()  # issue 20: 1,000 bins answered


def main(names):
    results = {}
    if os.path.exists(OUT):
        with open(OUT) as f:
            results = json.load(f)
    for name in names or list(SECTIONS):
        print("==> bench %s" % name, flush=True)
        figures = SECTIONS[name]()
        for k, v in figures.items():
            print("    %s = %s" % (k, v))
        results.update(figures)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote %s" % OUT)


if __name__ == "__main__":
    main(sys.argv[1:])
