"""The firmware's wake cycle, on CPython and on the real MicroPython VM, against simulated
hardware: what it sends must decode, with the gateway's codec, to what the sensor really saw."""
import random

import pytest
from hypothesis import given, strategies as st

from binlink.wire import airtime, codec

from binlink.firmware import config, measure, sensors, state
from binlink.sim.device import SimDevice
from tests.harness import decoded

KEY = bytes(range(16))  # TEST KEY


@pytest.fixture(params=["cpython", "micropython"])
def make_device(request, vm):
    clock = [1_790_000_000.0]

    def make(seed=1, **kw):
        d = SimDevice(random.Random(seed), 0xA1, KEY, lambda: clock[0],
                      vm=vm if request.param == "micropython" else None, **kw)
        d.clock_ref = clock
        return d

    return make


def run(dev, cycles, step_s=None):
    """cycles wake cycles, time advancing by the firmware's own sleep (or step_s)."""
    for _ in range(cycles):
        sleep = dev.wake()
        assert sleep and sleep > 0
        dev.clock_ref[0] += step_s or sleep
        dev.bin.advance(dev.clock_ref[0])


def readings(dev):
    rs = []
    for d in decoded(dev):
        if d["type"] == "reading":
            rs.append(d)
        elif d["type"] == "backlog":
            rs.extend(d["readings"])
    return rs


def test_cycles_report_the_true_distance(make_device):
    dev = make_device(seed=3, report_s=900)
    run(dev, 6)
    frames = decoded(dev)
    assert frames[0]["type"] == "hello" and frames[0]["reset_cause"] == "power_on"
    from binlink.wire import downlink

    # from firmware 1.4.0: the hash of the eight settings it runs, as a gateway computes it
    assert frames[0]["config_hash"] == downlink.settings_hash({downlink.SETTINGS[i][0]: dev.cfg[downlink.SETTINGS[i][0]]
                                                               for i in downlink.SETTINGS}).hex()
    rs = [d for d in frames if d["type"] == "reading"]
    assert len(rs) == 6
    for r in rs:
        true_fill, true_mm = dev.truth[r["fcnt"]]
        assert "sensor_fault" not in r["flags"]
        assert abs(r["distance_mm"] - true_mm) <= 15, (r, true_mm)  # temperature-compensated
        assert r["valid_pings"] >= 3 and r["pings"] == 5


def test_no_echo_is_a_fault_flag_not_a_level(make_device):
    dev = make_device()
    dev.sensor.broken = True
    run(dev, 1)
    (r,) = readings(dev)
    assert "sensor_fault" in r["flags"] and r["distance_mm"] is None and r["valid_pings"] == 0


def test_a_bin_filled_into_the_blind_zone_reads_full_not_faulty(make_device):
    """A JSN-SR04T loses the echo inside its blind zone (23-25 cm) rather than clamping it. A
    no-echo right after a reading at the blind zone's edge is the bin filling up to the lid: full
    (blind_zone), not a sensor fault; a sensor that goes silent on a half-empty bin is a fault."""
    dev = make_device(report_s=900)
    dev.sensor.p_no_echo = dev.sensor.p_spurious = 0.0
    surface = [300.0]
    dev.bin.surface_mm = lambda: surface[0]
    run(dev, 2)  # at the blind zone's edge
    surface[0] = 150.0  # overfilled: inside it
    run(dev, 3)
    full = readings(dev)[-3:]
    for r in full:
        assert "sensor_fault" not in r["flags"] and "blind_zone" in r["flags"], r
        assert r["distance_mm"] == dev.cfg["blind_mm"], r
    surface[0] = 900.0  # emptied
    run(dev, 1)
    assert readings(dev)[-1]["flags"] == [] and abs(readings(dev)[-1]["distance_mm"] - 900) < 60
    dev.sensor.broken = True  # silent now, far from full: a fault
    run(dev, 1)
    assert "sensor_fault" in readings(dev)[-1]["flags"]


def test_transport_outage_fills_backlog_then_delivers_it(make_device):
    dev = make_device(transport="rylr998", report_s=900)
    run(dev, 1)
    dev.hw.module_down = True
    run(dev, 6)
    s = state.unpack(dev.hw.rtc)
    assert len(s.backlog) == 6
    dev.hw.module_down = False
    run(dev, 3)
    assert not state.unpack(dev.hw.rtc).backlog
    rs = readings(dev)
    fcnts = [r["fcnt"] for r in rs]
    assert len(rs) == 1 + 6 + 3 and len(set(fcnts)) == len(fcnts)
    batches = [d for d in decoded(dev) if d["type"] == "backlog"]
    assert batches and all(len(b["readings"]) <= 4 for b in batches)
    ages = [r["age_min"] for b in batches for r in b["readings"]]
    assert max(ages) >= 75  # the oldest buffered reading waited six wakes


def test_counter_survives_sleep_and_power_loss_without_reuse(make_device):
    dev = make_device(report_s=900, nvs_every=4)
    run(dev, 5)
    before = [d["fcnt"] for d in decoded(dev)]
    dev.hw.power_loss()
    run(dev, 5)
    after = [d["fcnt"] for d in decoded(dev)][len(before):]
    assert min(after) > max(before), (before, after)  # skipped ahead, never reused
    assert min(after) - max(before) <= 4
    hello = [d for d in decoded(dev) if d["type"] == "hello"]
    assert len(hello) == 2  # a hello after each cold boot


def test_rtc_budget_holds_through_a_long_outage(make_device):
    dev = make_device(transport="rylr998", report_s=900)
    dev.hw.module_down = True
    if dev.vm is None:
        run(dev, 130)
    else:  # the VM takes 1.6 s a wake with the radio down: 125 wakes on CPython (the same firmware
        # files), their RTC memory and NVS then given to the VM's board asleep after its power-on wake
        first = SimDevice(random.Random(1), 0xA1, KEY, lambda: dev.clock_ref[0], transport="rylr998", report_s=900)
        first.clock_ref, first.bin = dev.clock_ref, dev.bin
        first.hw.module_down = True
        run(dev, 1)
        run(first, 125)
        dev.hw.esp.rtc, dev.hw.esp.nvs = first.hw.esp.rtc, dict(first.hw.esp.nvs)
        run(dev, 5)
    s = state.unpack(dev.hw.rtc)
    assert len(dev.hw.rtc) <= 2048
    assert len(s.backlog) == state.BACKLOG_CAP and s.dropped == 130 - state.BACKLOG_CAP


def test_fire_is_reported_at_once(make_device):
    dev = make_device(report_s=3600)
    run(dev, 2)
    n = len(readings(dev))
    dev.hw.hot_c = 85.0
    run(dev, 1)
    r = readings(dev)[-1]
    assert len(readings(dev)) == n + 1
    assert {"fire", "alarm_wake"} <= set(r["flags"]) and r["temperature_c"] == 85


def test_tilt_and_emptied_are_reported_at_once(make_device):
    dev = make_device(report_s=3600)
    run(dev, 2)
    n = len(readings(dev))
    dev.hw.tilted = True
    run(dev, 1)
    assert "tilt" in readings(dev)[-1]["flags"] and len(readings(dev)) == n + 1
    dev.hw.tilted = False
    dev.bin.level = 0.9
    run(dev, 1)
    dev.bin.level = 0.0  # collected
    run(dev, 1)
    assert readings(dev)[-1]["distance_mm"] > 1100


def test_a02yyuw_sensor(make_device):
    dev = make_device(sensor="a02yyuw", report_s=900)
    run(dev, 3)
    for r in readings(dev):
        assert abs(r["distance_mm"] - dev.truth[r["fcnt"]][1]) <= 60  # its own 343 m/s, then ours


def test_a_crashing_cycle_counts_the_error_and_sleeps(make_device):
    dev = make_device()
    dev.hw.op_time_pulse_us = None  # a driver fault: the echo measurement raises OSError
    sleep = dev.wake()
    assert sleep == dev.cfg["wake_s"]
    assert state.unpack(dev.hw.rtc).errors == 1


def test_duty_cycle_never_exceeded_in_any_hour():
    """Alarms every wake (worst case) at SF12: airtime in any sliding hour stays under 36 s."""
    clock = [0.0]
    dev = SimDevice(random.Random(2), 0xA1, KEY, lambda: clock[0], sf=12, wake_s=60, report_s=60)
    dev.clock_ref = clock
    run(dev, 300)
    sends = [(t, airtime.time_on_air_ms(len(p), 12)) for t, p in dev.sent]
    for t0, _ in sends:
        in_hour = sum(ms for t, ms in sends if t0 <= t < t0 + 3600)
        assert in_hour <= 36000, in_hour


def test_bad_config_gives_problems_and_safe_defaults():
    cfg, h, problems = config.parse({"device_id": "a1", "key": "zz", "pings": 40, "colour": 1}, b"{}")
    assert not config.usable(cfg)
    assert any("device_id" in p for p in problems) and any("key" in p for p in problems)
    assert any("unknown key colour" in p for p in problems) and cfg["pings"] == config.DEFAULTS["pings"]
    cfg, h, problems = config.load("/nonexistent/config.json")
    assert problems and "unreadable" in problems[0] and not config.usable(cfg)


# measurement and drivers -------------------------------------------------------------------------

@given(st.floats(300, 4000), st.floats(-25, 45), st.integers(3, 9))
def test_temperature_compensation(true_mm, temp_c, pings):
    c = measure.speed_of_sound(temp_c)
    raw = true_mm * 343.0 / c  # what a sensor assuming 343 m/s reports
    d, valid, flags = measure.reading([raw] * pings, pings, temp_c, 250, 4500)
    assert flags == 0 and valid == pings and abs(d - true_mm) <= 1


@given(st.floats(400, 3000), st.lists(st.floats(250, 3000), max_size=2), st.integers(0, 2))
def test_median_drops_stray_echoes(true_mm, strays, no_echoes):
    samples = [true_mm] * 4 + strays + [None] * no_echoes
    d, valid, flags = measure.reading(samples, len(samples), 20.0, 250, 4500)
    # four agreeing echoes outvote two strays: the median is the true echo, to the rounding mm
    true_at_20c = true_mm * measure.speed_of_sound(20.0) / 343.0
    assert flags == 0 and abs(d - true_at_20c) <= 0.5
    near = sum(1 for x in strays if abs(x - true_mm) * measure.speed_of_sound(20.0) / 343.0 <= measure.OUTLIER_MM)
    assert valid == 4 + near  # a stray far from the median is dropped, one near it counts


def test_blind_zone_means_full_and_no_echo_means_fault():
    assert measure.reading([100.0] * 5, 5, 20, 250, 4500)[2] == codec.F_BLIND_ZONE
    assert measure.reading([None] * 5, 5, 20, 250, 4500) == (None, 0, codec.F_SENSOR_FAULT)
    assert measure.reading([9000.0] * 5, 5, 20, 250, 4500)[2] == codec.F_SENSOR_FAULT  # out of range
    # two pings disagreeing wildly with no majority: noise, not a level
    assert measure.reading([500.0, 2500.0, None, None, None], 5, 20, 250, 4500)[2] == codec.F_SENSOR_FAULT


@given(st.integers(1, 0xFFFF), st.binary(max_size=8), st.binary(max_size=8))
def test_a02_frame_parser_resyncs_and_checks_the_sum(mm, before, after):
    h, l = mm >> 8, mm & 0xFF
    frame = bytes([0xFF, h, l, (0xFF + h + l) & 0xFF])
    # noise without the 0xFF start byte around a frame: the parser resyncs on it and reads it exactly
    assert sensors.parse_a02(before.replace(b"\xff", b"\x00") + frame + after.replace(b"\xff", b"\x00")) == mm
    assert sensors.parse_a02(bytes([0xFF, 0, 7, 6]) + frame) == mm  # two frames: the newest one
    bad = bytes([0xFF, h, l, (0xFF + h + l + 1) & 0xFF])
    assert sensors.parse_a02(bad) is None


def test_echo_timeouts_are_faults():
    class HW:
        def __init__(self, v):
            self.v = v

        def pulse_us(self, trig, echo, timeout):
            return self.v

    assert sensors.EchoSensor(HW(-1), 1, 2, 4500).ping() is None
    assert sensors.EchoSensor(HW(-2), 1, 2, 4500).ping() is None
    assert abs(sensors.EchoSensor(HW(5831), 1, 2, 4500).ping() - 1000) < 1


def test_airtime_matches_semtech_calculator():
    assert round(airtime.time_on_air_ms(16, 7), 1) == 51.5
    assert round(airtime.time_on_air_ms(16, 12), 1) == 1318.9
    assert round(airtime.time_on_air_ms(64, 12), 1) == 2793.5  # a 51-byte LoRaWAN payload, max at SF12


def test_main_sleeps_safely_and_never_arms_a_wake_that_fires_at_once(tmp_path, monkeypatch):
    """main(): no usable config -> a long safe sleep; a bin lying tipped over must not re-arm
    the tilt wake (the pin is already low: it would wake at once, forever, until the battery dies)."""
    from binlink.firmware import app

    calls = []

    class HW:
        tilted = True

        def wdt_start(self, ms):
            calls.append(("wdt", ms))

        def deepsleep(self, ms):
            calls.append(("deepsleep", ms))

        def wake_on_pin(self, pin, level):
            calls.append(("wake_on_pin", pin))

        def pin_read(self, pin):
            return 0 if self.tilted else 1

    monkeypatch.setattr(config, "load", lambda path="/config.json": config.parse({}, b""))
    app.main(HW())
    assert calls == [("wdt", config.DEFAULTS["wdt_ms"]), ("deepsleep", config.SAFE_SLEEP_S * 1000)]
    calls.clear()
    good = {"device_id": 1, "key": "00" * 16, "tilt_pin": 33}
    monkeypatch.setattr(config, "load", lambda path="/config.json": config.parse(good, b"{}"))
    monkeypatch.setattr(app, "run_cycle", lambda hw, cfg, chash: 900)
    h = HW()
    app.main(h)
    assert ("wake_on_pin", 33) not in calls and calls[-1] == ("deepsleep", 900000)
    h.tilted = False
    calls.clear()
    app.main(h)
    assert calls == [("wdt", 30000), ("wake_on_pin", 33), ("deepsleep", 900000)]


def test_e22_is_woken_for_sending_and_put_to_sleep_after(make_device):
    dev = make_device()
    run(dev, 1)
    m0, m1 = dev.cfg["radio_m0_pin"], dev.cfg["radio_m1_pin"]
    pins = dev.hw.esp.pins
    assert pins[m0]["level"] == 1 and pins[m1]["level"] == 1  # asleep while the bin sleeps
    assert pins[m0]["hold"] and pins[m1]["hold"]
    assert [t for t, _ in dev.hw.radio.packets]  # and awake (normal mode) to send


def test_hello_with_the_full_counter_every_day(make_device):
    """Besides each cold boot, the first report of every day follows a hello naming the full
    counter, so a gateway that lost the bin's counter takes it up within a day at the latest."""
    dev = make_device(report_s=3600, wake_s=3600)
    run(dev, 24 * 3 + 2)  # three days of hourly wakes
    ds = decoded(dev)
    hellos = [d for d in ds if d["type"] == "hello"]
    assert 3 <= len(hellos) <= 4 and all(h["version"] == 2 for h in hellos)
    assert len({h["fcnt"] for h in hellos}) == len(hellos)
    for h in hellos[1:]:  # each daily hello is followed directly by that wake's reading
        nxt = ds[ds.index(h) + 1]
        assert nxt["type"] in ("reading", "backlog") and nxt["fcnt"] == h["fcnt"] + 1


def test_every_failure_ends_in_deep_sleep_with_the_watchdog_running_first(monkeypatch):
    """An unreadable config, an invalid pin, a failing state save in the cycle's finally: the wake
    ends in deep sleep each time (never the REPL at ~40 mA), the watchdog started before anything
    that can hang; a Ctrl-C from the technician's tool still reaches the REPL."""
    from binlink.firmware import app

    calls = []

    class HW:
        def __init__(self, fail_at=()):
            self.fail_at = fail_at

        def _call(self, name, *args):
            calls.append(name)
            if name in self.fail_at:
                raise OSError("injected: %s" % name)

        def wdt_start(self, ms):
            self._call("wdt_start")

        def pin_read(self, pin):
            self._call("pin_read")
            return 1

        def wake_on_pin(self, pin, level):
            self._call("wake_on_pin")

        def deepsleep(self, ms):
            calls.append(("deepsleep", ms))

    def broken_load(path="/config.json"):
        raise MemoryError("heap exhausted reading the config")

    monkeypatch.setattr(config, "load", broken_load)
    app.main(HW())
    assert calls == ["wdt_start", ("deepsleep", config.SAFE_SLEEP_S * 1000)]
    good, _, problems = config.parse({"device_id": 1, "key": "00" * 16, "tilt_pin": 33, "wake_s": 600}, b"{}")
    assert not problems
    for fail in ("pin_read", "wake_on_pin", "wdt_start"):
        calls.clear()
        app.start(HW(fail_at=(fail,)), good, b"\0" * 4)
        assert calls[0] == "wdt_start" and calls[-1] == ("deepsleep", (600 if fail != "wdt_start" else 3600) * 1000), (fail, calls)

    def save_fails(hw, s):
        raise OSError("RTC memory write failed")

    slept = []
    monkeypatch.setattr(app.state, "save", save_fails)
    monkeypatch.setattr(app.state, "load", lambda hw: app.state.State())
    from binlink.firmware import transports

    monkeypatch.setattr(transports, "make", lambda hw, cfg: Radio())

    class Radio:
        def sleep(self):
            slept.append(True)

    monkeypatch.setattr(app, "_cycle", lambda hw, cfg, chash, s, radio: (radio.get(), 1234)[1])
    calls.clear()
    app.start(HW(), good, b"\0" * 4)
    assert slept == [True] and calls[-1] == ("deepsleep", 600 * 1000)  # radio asleep, then the board

    def interrupted(hw, cfg, chash):
        raise KeyboardInterrupt

    monkeypatch.setattr(app, "run_cycle", interrupted)
    with pytest.raises(KeyboardInterrupt):
        app.start(HW(), good, b"\0" * 4)


@pytest.mark.parametrize("key, pin", [("tilt_pin", 5), ("tilt_pin", 23), ("radio_m0_pin", 34), ("radio_m1_pin", 18),
                                      ("radio_aux_pin", 21)])
def test_pins_that_cannot_wake_or_hold_through_deep_sleep_are_refused(key, pin):
    cfg, _, problems = config.parse({"device_id": 1, "key": "00" * 16, key: pin}, b"{}")
    assert any(p.startswith("%s %d cannot" % (key, pin)) for p in problems), problems
    assert cfg[key] == config.DEFAULTS[key]


def test_a_watchdog_timeout_the_chip_refuses_is_replaced():
    cfg, _, problems = config.parse({"device_id": 1, "key": "00" * 16, "wdt_ms": 0}, b"{}")
    assert "wdt_ms must be 1000..120000" in problems and cfg["wdt_ms"] == config.DEFAULTS["wdt_ms"]


def test_the_trigger_pulse_is_wide_enough_on_its_own(make_device, monkeypatch):
    """The JSN-SR04T answers a trigger of 20 us or more. On a fast interpreter the pulse is only
    what the firmware asks for: with the interpreter's time around each call taken out, the
    firmware's own pulse must still make the sensor ping (10 us, as before 1.3.0, does not)."""
    from binlink.sim.parts import esp32
    monkeypatch.setattr(esp32, "CALL_MS", 0.0)
    dev = make_device(report_s=900)
    dev.sensor.p_no_echo = dev.sensor.p_spurious = 0.0
    run(dev, 1)
    r = readings(dev)[-1]
    assert "sensor_fault" not in r["flags"] and r["valid_pings"] > 0, r  # a pulse too short: no ping at all
