"""The bin's side of the downlink (issue 20), the real firmware on CPython and the MicroPython VM
against the part models' receive side: a scripted gateway hears each uplink on air and, when the
bin asks (F_LISTENING), answers in its window with downlink.encode, on air at the bin's rate."""
import random

import pytest
from hypothesis import given, strategies as st

from binlink.wire import airtime, codec, downlink, framing

from binlink.firmware import listen, state
from binlink.sim.device import SimDevice
from binlink.sim.parts import lora
from tests.harness import decoded

KEY = bytes(range(16))  # TEST KEY
DEV = 0xA1
T0 = 1_790_000_000.0


class Gateway:
    """Hears every uplink the bin puts on air (unless told to lose it), stores what verifies, and
    answers a frame flagged F_LISTENING TURNAROUND_MS after it leaves the air. `make(fcnt, frame)`
    may replace the answer (None: stay silent)."""

    TURNAROUND_MS = 120.0

    def __init__(self, dev, ack=True, time=True, config=None, pace=None, echo=None):
        self.dev = dev
        self.ack, self.time, self.config, self.pace, self.echo = ack, time, config, pace, echo
        self.stored = {}  # fcnt of every uplink frame stored -> decoded frame
        self.lose = set()  # uplink counters lost on air (not stored, not answered)
        self.answers = []  # (answered fcnt, downlink bytes, start ms)
        self.make = None
        self.last = None
        dev._transmit = self._heard

    def _heard(self, dev, payload, on_air_len):
        hw = dev.hw
        rylr = dev.cfg["transport"] == "rylr998"
        if dev.cfg["transport"] == "wifi":  # the uplink is at the broker when publish returns
            sf, bw, pre = None, None, None
        elif rylr:
            sf, bw = hw.radio.sf_bw()
            pre = hw.radio.preamble()
        elif dev.cfg["transport"] == "serial":
            sf, bw, pre = None, None, None
        else:
            sf, bw = hw.radio.air()
            pre = 8
        end = hw.now + (1000.0 * lora.time_on_air_s(on_air_len, sf, bw * 1000, preamble=pre) if sf else 0.0)
        for f in dev.frames_in(payload):
            d = codec.decode(f, KEY, self.last)
            self.last = d["fcnt"]
            if d["fcnt"] in self.lose:
                continue
            self.stored[d["fcnt"]] = d
            if d["type"] == "reading" and f[10] & downlink.F_LISTENING:
                self._answer(hw, d["fcnt"], f, end, sf, bw, rylr)
        return True

    def _answer(self, hw, fcnt, uplink, end, sf, bw, rylr):
        start = end + self.TURNAROUND_MS
        if self.make is not None:
            frame = self.make(fcnt, uplink)
        else:
            bits = 0
            for k in range(32):
                if fcnt - k in self.stored:
                    bits |= 1 << k
            t_ms = int((hw.epoch0 + start / 1000.0) * 1000) if self.time else None  # true time as it goes on air
            frame = downlink.encode(KEY, DEV, fcnt, ack=bits if self.ack else None, time_ms=t_ms, config=self.config,
                                    pace_min=self.pace, echo=self.echo)
        if frame is None:
            return
        self.answers.append((fcnt, frame, start))
        if self.dev.cfg["transport"] == "wifi":  # through the broker, on the bin's downlink topic
            hw.mqtt_deliver("%s/%06x" % (self.dev.cfg["mqtt_downlink_topic"], DEV), frame, start)
        elif rylr:
            hw.air_packet(frame.hex().upper().encode(), start, sf, bw)
        elif sf is None:
            hw.air_packet(framing.frame(frame), start, 0, 0)
        else:
            hw.air_packet(framing.frame(frame), start, sf, bw)


@pytest.fixture(params=["cpython", "micropython"])
def make_device(request, vm):
    clock = [T0]

    def make(seed=1, **kw):
        kw.setdefault("report_s", 900)
        d = SimDevice(random.Random(seed), DEV, KEY, lambda: clock[0], vm=vm if request.param == "micropython" else None,
                      **kw)
        d.clock_ref = clock
        return d

    return make


def run(dev, cycles):
    sleeps = []
    for _ in range(cycles):
        s = dev.wake()
        assert dev.hw.halted == "deepsleep"
        sleeps.append(s)
        dev.clock_ref[0] += s
        dev.bin.advance(dev.clock_ref[0])
    return sleeps


def readings_at(gw):
    """Reading counters the gateway stored, as single readings or inside backlog batches."""
    out = set()
    for d in gw.stored.values():
        if d["type"] == "reading":
            out.add(d["fcnt"])
            out.update(e["fcnt"] for e in d.get("echoes", ()))
        elif d["type"] == "backlog":
            out.update(r["fcnt"] for r in d["readings"])
    return out


def sent_readings(dev):
    return {d["fcnt"] for d in decoded(dev) if d["type"] == "reading"}


def rtc(dev):
    return state.unpack(dev.hw.rtc)


def current(dev):
    """The eight settings as the bin's last hello names them (by hash)."""
    return [d for d in decoded(dev) if d["type"] == "hello"][-1]["config_hash"]


def settings_of(dev, **change):
    s = {downlink.SETTINGS[i][0]: dev.cfg[downlink.SETTINGS[i][0]] for i in downlink.SETTINGS}
    s.update(change)
    return s


def test_backlog_is_kept_until_acknowledged_and_a_lost_batch_is_resent(make_device):
    """Module down for five reports: a backlog. When it is back the bin listens (it holds a
    backlog), the first batch is lost on air: the ack leaves it out, so those readings stay in the
    backlog and go again next wake; the acknowledged ones leave the bin. Firmware 1.3 drops every
    batch it sent: the lost one would be gone for good."""
    dev = make_device(transport="rylr998")
    gw = Gateway(dev)
    run(dev, 1)
    dev.hw.module_down = True
    run(dev, 5)
    assert len(rtc(dev).backlog) == 5
    dev.hw.module_down = False
    first_batch = rtc(dev).fcnt  # the counter the first batch will take
    gw.lose.add(first_batch)
    run(dev, 1)
    s = rtc(dev)
    assert gw.answers and gw.answers[-1][0] == max(gw.stored)
    lost = [r["fcnt"] for d in decoded(dev) if d["type"] == "backlog" and d["fcnt"] == first_batch for r in d["readings"]]
    assert lost and [e[0] for e in s.backlog] == lost, (lost, s.backlog)  # only the lost batch's readings are kept
    assert not s.unconfirmed
    run(dev, 1)
    assert not rtc(dev).backlog and not rtc(dev).unconfirmed
    assert sent_readings(dev) <= readings_at(gw)  # every reading measured reached the gateway


def test_a_reading_lost_on_air_between_windows_is_resent(make_device):
    """E22: no delivery feedback on send. Once a gateway has answered, readings sent between
    windows wait unconfirmed; the next answer shows one missing and it is resent."""
    dev = make_device(listen_every=3)
    gw = Gateway(dev)
    run(dev, 2)  # cold boot (listens: clock never set) and one more
    assert gw.answers
    nxt = rtc(dev).fcnt
    gw.lose.add(nxt)  # the next reading is lost on air
    run(dev, 4)
    assert nxt in sent_readings(dev) and nxt in readings_at(gw), (nxt, sorted(readings_at(gw)))
    assert sent_readings(dev) <= readings_at(gw)


def test_one_silent_window_resends_only_its_own_reading_and_two_in_a_row_send_all_again(make_device):
    """No answer: most often the flagged uplink itself collided, so its reading goes again, with
    the next report (firmware 1.7.0; before, it waited for the next window, hours under a pace); the
    earlier readings wait for the next answer, which finds them stored, and are not sent twice (at
    a thousand bins, resending everything after every silent window, skipped answers included,
    tripled the traffic). Two silent windows in a row: the link may be down, all go again."""
    dev = make_device(listen_every=2)
    gw = Gateway(dev)
    run(dev, 2)  # the cold boot's window is answered: a gateway that answers
    silent = lambda fcnt, up: None  # noqa: E731
    gw.make = silent
    run(dev, 2)
    flagged = [codec.verify(f, KEY, None) for f in dev.frames()  # the uplink the silent window followed
               if f[0] & 0x0F == codec.T_READING and f[10] & downlink.F_LISTENING][-1]
    s = rtc(dev)
    resent = [r["fcnt"] for d in decoded(dev) if d["type"] == "backlog" for r in d["readings"]]
    assert resent == [flagged] and not s.backlog and s.dl & state.DL_MISSED
    waiting = [e[1] for e in s.unconfirmed if e[1] != flagged]
    assert waiting
    gw.make = None
    run(dev, 2)
    s = rtc(dev)  # the answer judged everything before it; what waits now was sent after it
    assert not s.backlog and all(e[0] > gw.answers[-1][0] for e in s.unconfirmed)
    resent = {r["fcnt"] for d in decoded(dev) if d["type"] == "backlog" for r in d["readings"]}
    assert resent == {flagged} and not resent & set(waiting)  # only the silent window's own reading went twice
    assert sent_readings(dev) <= readings_at(gw)
    gw.make = silent
    run(dev, 4)  # two silent windows in a row
    # everything sent since the last answer goes again, oldest first, one batch a report
    second = [codec.verify(f, KEY, None) for f in dev.frames() if f[0] & 0x0F == codec.T_READING and f[10] & downlink.F_LISTENING][-1]
    unjudged = {f for f in sent_readings(dev) if gw.answers[-1][0] < f <= second}
    again = [r["fcnt"] for d in decoded(dev) if d["type"] == "backlog" and d["fcnt"] > second for r in d["readings"]]
    assert again + [e[0] for e in rtc(dev).backlog] == sorted(unjudged), (again, unjudged)


def test_after_silent_windows_a_backlog_waits_for_the_next_report(make_device):
    """Readings sent again after two silent windows ride with the regular reports: a congested or
    lost link is not sent more often (at a thousand bins, reporting at every wake with a backlog
    tripled the packets on air). A bin whose module failed (no window missed) still sends its
    backlog at the next wake."""
    dev = make_device(report_s=3600, listen_every=1)  # wakes every 900 s, reports hourly, every report listens
    dev.sensor.p_no_echo = dev.sensor.p_spurious = 0.0
    gw = Gateway(dev)
    run(dev, 1)
    gw.make = lambda fcnt, up: None
    run(dev, 9)  # two silent windows: the readings they left unjudged are in the backlog
    assert rtc(dev).backlog and rtc(dev).dl & state.DL_MISSED
    sending = []
    for _ in range(8):
        n = len(dev.frames())
        run(dev, 1)
        sending.append(len(dev.frames()) > n)
    assert 1 <= sum(sending) <= 2, sending  # the hourly reports (each with a batch), nothing between


def test_config_applies_survives_reset_and_deep_sleep_and_the_hello_reports_it(make_device):
    """A gateway sends wake_s 600 (was 900) and fire_c 60: the bin applies them (it sleeps ~600 s),
    says hello with the hash of the settings it now runs, and keeps them through deep sleep, a
    watchdog reset and a power loss."""
    dev = make_device(report_s=1800)
    want = settings_of(dev, wake_s=600, fire_c=60)
    old_hash = downlink.settings_hash(settings_of(dev)).hex()
    gw = Gateway(dev, config=(downlink.settings_hash(want), {"wake_s": 600, "fire_c": 60}))
    assert 570 <= run(dev, 1)[0] <= 630  # applied in the cold boot's own window
    hellos = [d for d in decoded(dev) if d["type"] == "hello"]
    assert hellos[0]["config_hash"] == old_hash  # the cold boot's hello: the settings as provisioned
    assert len(hellos) == 2 and current(dev) == downlink.settings_hash(want).hex()  # then the new ones
    gw.config = None
    sleeps = run(dev, 3)
    assert all(570 <= s <= 630 for s in sleeps), sleeps  # deep sleep: still 600 s
    dev.hw.inject_reset(5, "watchdog")
    sleeps = run(dev, 1)
    assert 570 <= sleeps[0] <= 630
    dev.hw.power_loss()
    sleeps = run(dev, 2)
    assert all(570 <= s <= 630 for s in sleeps), sleeps
    hellos = [d for d in decoded(dev) if d["type"] == "hello"]
    assert hellos[-1]["reset_cause"] == "power_on" and hellos[-1]["config_hash"] == downlink.settings_hash(want).hex()


def _forge(fcnt, settings_bytes):
    """A downlink the codec would never build (a setting out of range), tagged correctly."""
    head = codec._header(downlink.T_DOWNLINK, DEV, fcnt) + bytes([downlink.C_CONFIG]) + b"\0\0\0\0" + bytes([1]) + settings_bytes
    return head + downlink._tag(KEY, fcnt, head)


@pytest.mark.parametrize("how", ["out_of_range", "report_below_wake"])
def test_a_refused_config_keeps_the_old_settings_and_the_bin_reports(make_device, how):
    dev = make_device()
    old_hash = downlink.settings_hash(settings_of(dev)).hex()
    gw = Gateway(dev)
    if how == "out_of_range":
        gw.make = lambda fcnt, up: _forge(fcnt, bytes([1]) + (30).to_bytes(4, "big"))  # wake_s 30 s: under 60
    else:  # in range alone, but shorter than the bin's wake_s of 900 s
        gw.make = lambda fcnt, up: downlink.encode(KEY, DEV, fcnt, config=(b"\1\2\3\4", {"report_s": 300}))
    n = len(sent_readings(dev))
    sleeps = run(dev, 3)
    assert gw.answers
    assert all(850 <= s <= 950 for s in sleeps), sleeps
    hellos = [d for d in decoded(dev) if d["type"] == "hello"]
    assert len(hellos) >= 2 and all(h["config_hash"] == old_hash for h in hellos)  # the refusal reported: old hash
    assert len(sent_readings(dev)) == n + 3  # still reporting
    assert dev.hw.esp.nvs.get(("binlink", "settings")) is None  # nothing kept


def test_replayed_forged_foreign_and_reflected_downlinks_change_nothing(make_device):
    """Each window gets one bad answer carrying wake_s 600, time and an ack: the bin keeps its
    settings, its clock unset and its unconfirmed readings."""
    dev = make_device(listen_every=1)
    dev.hw.rtc_error_s = -500.0
    gw = Gateway(dev)
    change = {"wake_s": 600}
    want = downlink.settings_hash(settings_of(dev, **change))
    recorded = {}

    def good(fcnt):
        return downlink.encode(KEY, DEV, fcnt, ack=1, time_ms=int(T0 * 1000), config=(want, change))

    def replay(fcnt, up):
        recorded[fcnt] = good(fcnt)
        return recorded.get(fcnt - 1)  # recorded in the window of the bin's previous uplink

    def forged(fcnt, up):
        f = bytearray(good(fcnt))
        f[-1] ^= 0x01
        return bytes(f)

    def foreign(fcnt, up):
        return downlink.encode(KEY, DEV + 1, fcnt, ack=1, config=(want, change))

    def reflected(fcnt, up):
        return up  # the bin's own uplink played back

    def other_key(fcnt, up):
        return downlink.encode(bytes(16), DEV, fcnt, ack=1, config=(want, change))

    gw.make = lambda fcnt, up: None
    run(dev, 1)  # the cold boot: silent window
    for make in (replay, replay, forged, foreign, reflected, other_key):
        gw.make = make
        sleeps = run(dev, 1)
        assert 850 <= sleeps[0] <= 950
        s = rtc(dev)
        assert s.clock_at == 0 and not s.dl & state.DL_HEARD, make.__name__
    assert len(gw.answers) >= 5
    assert dev.hw.esp.nvs.get(("binlink", "settings")) is None
    assert current(dev) == downlink.settings_hash(settings_of(dev)).hex()
    gw.make = lambda fcnt, up: good(fcnt)  # the genuine answer, for once: applied
    assert 570 <= run(dev, 1)[0] <= 630
    assert rtc(dev).clock_at != 0 and current(dev) == want.hex()


def wake_charge_uAh(dev, span_ms=5000.0):
    """One wake's charge from the board's counter, from the wake to span_ms after it (into the deep
    sleep that follows: an EBYTE finishes its packet on air after the ESP32 sleeps)."""
    s = dev.wake()
    hw = dev.hw
    assert hw.halted == "deepsleep"
    c = dev.awake_charge_uAh * 3.6
    c1 = hw.charge_mAs
    hw.advance(hw.now - hw.awake_ms + span_ms - hw.now)
    dev.clock_ref[0] += s
    dev.bin.advance(dev.clock_ref[0])
    return (c + hw.charge_mAs - c1) / 3.6


def test_a_window_with_no_answer_costs_only_the_window_and_ends_in_deep_sleep(make_device):
    """Same wake twice, listening or not, no gateway answering: the difference is the window (the
    E22 receiving at ~12 mA, the ESP32 in light sleep) and nothing else; each ends in deep sleep.
    (listen_every 4: a bin no gateway has answered listens every second report.)"""
    dev = make_device(listen_every=4)
    dev.sensor.p_no_echo = dev.sensor.p_spurious = 0.0
    run(dev, 2)  # cold boot (a silent window) then a report that does not listen
    awake, charge = [], []
    for _ in range(4):
        charge.append(wake_charge_uAh(dev))
        awake.append(dev.hw.awake_ms)
    frames = [f for f in dev.frames() if f[0] & 0x0F == codec.T_READING][-4:]
    listened = [bool(f[10] & downlink.F_LISTENING) for f in frames]
    assert listened == [True, False, True, False], listened
    w = listen.window_ms(dev.cfg, _transport(dev), frames[0])
    extra = (awake[0] + awake[2]) / 2 - (awake[1] + awake[3]) / 2
    assert w <= extra <= w + 50, (extra, w)
    extra_uAh = (charge[0] + charge[2]) / 2 - (charge[1] + charge[3]) / 2
    # the window opens with the uplink's rest on air, which the module transmits in both wakes (the
    # other sleeps the chip and leaves the packet to the module): it receives for the remainder, the
    # chip light-sleeps throughout
    t = _transport(dev)
    on_air = airtime.time_on_air_ms(t.on_air_len(frames[0]), dev.cfg["sf"], dev.cfg["bandwidth_khz"], preamble=t.PREAMBLE)
    rx_uAh = ((w - on_air) * (dev.hw.radio.RX_MA + 0.8) + on_air * 0.8) / 3600.0
    assert 0.8 * rx_uAh <= extra_uAh <= 1.2 * rx_uAh, (extra_uAh, rx_uAh)


def _transport(dev):
    from binlink.firmware import transports

    return transports.make(None, dev.cfg)


WIFI = dict(transport="wifi", wifi_ssid="depot", mqtt_host="10.0.0.2")


def test_a_wifi_bin_hears_its_answer_on_its_topic_and_applies_it(make_device):
    """Wi-Fi: the bin subscribes to <mqtt_downlink_topic>/<device> before its first publish of the
    wake and reads its socket through the window; the answer's ack, time and settings apply as on
    air, and a reading the gateway shows missing goes again."""
    dev = make_device(report_s=1800, listen_every=2, **WIFI)
    dev.hw.rtc_error_s = -300.0
    want = settings_of(dev, wake_s=600)
    gw = Gateway(dev, config=(downlink.settings_hash(want), {"wake_s": 600}))
    assert 570 <= run(dev, 1)[0] <= 630  # applied in the cold boot's window
    assert gw.answers and current(dev) == downlink.settings_hash(want).hex()
    s = rtc(dev)
    assert s.clock_at and abs((dev.hw.epoch() + dev.hw.rtc_error_s) * 1000.0 + s.clock_ms - dev.hw.epoch() * 1000.0) < 50
    gw.config = None
    nxt = rtc(dev).fcnt
    gw.lose.add(nxt)  # the broker took it, the gateway lost it (a crash before its commit)
    run(dev, 12)  # four reports (every 1,800 s, wakes every 600 s): windows at the second and fourth
    assert nxt in sent_readings(dev) and sent_readings(dev) <= readings_at(gw)


def test_a_wifi_broker_refusing_the_subscription_or_the_bin_costs_answers_never_readings(make_device):
    """The broker's ACL denies the bin its downlink topic (SUBACK 0x80, umqtt raises): the bin
    still publishes every reading and sleeps, hearing no answer. A broker that refuses the bin's
    credentials (CONNACK 5): the readings wait in the backlog, every wake ends in deep sleep, and
    they go once it accepts the bin again."""
    dev = make_device(listen_every=1, **WIFI)
    dev.sensor.p_no_echo = dev.sensor.p_spurious = 0.0
    gw = Gateway(dev)
    dev.hw.wifi["denied"] = {"binlink/downlink/%06x" % DEV}
    run(dev, 3)
    assert len(sent_readings(dev)) == 3 and sent_readings(dev) <= readings_at(gw)
    assert rtc(dev).clock_at == 0  # the answers never reached it
    dev.hw.wifi["denied"] = set()
    dev.hw.wifi["broker"] = "refuses"
    run(dev, 2)
    assert dev.hw.halted == "deepsleep" and len(rtc(dev).backlog) == 2
    dev.hw.wifi["broker"] = "ok"
    run(dev, 1)
    s = rtc(dev)
    assert not s.backlog and s.clock_at and len(readings_at(gw)) == 6  # 3 + the 2 held back + this wake's


def test_a_wifi_window_with_no_answer_ends_in_deep_sleep_and_costs_the_window(make_device):
    """No gateway answers: the bin reads its socket until the window closes (Wi-Fi on: the cost is
    the window at the radio's current), then disconnects and sleeps; a broker that drops the
    connection mid-window ends the window at once. (listen_every 4: a bin no gateway has answered
    listens every second report.)"""
    dev = make_device(listen_every=4, **WIFI)
    dev.sensor.p_no_echo = dev.sensor.p_spurious = 0.0
    Gateway(dev).make = lambda fcnt, up: None
    run(dev, 2)
    awake = []
    for _ in range(4):
        run(dev, 1)
        awake.append(dev.hw.awake_ms)
    w = listen.window_ms(dev.cfg, _transport(dev), b"")
    extra = (awake[0] + awake[2]) / 2 - (awake[1] + awake[3]) / 2
    assert w <= extra <= w + 80, (extra, w)

    def drop(fcnt, up):  # the broker drops the connection 50 ms into the window (a restart)
        dev.hw.mqtt_deliver(None, b"", dev.hw.now + 50.0)

    Gateway(dev).make = drop
    run(dev, 1)
    assert dev.hw.halted == "deepsleep" and dev.hw.awake_ms < awake[1] + 150, (dev.hw.awake_ms, awake)


def test_two_settings_of_the_clock_teach_the_bin_its_rtcs_rate(make_device):
    """The ESP32's RTC runs ~1 % fast in deep sleep (parts/esp32.py: this unit 0.49-1.06 %). Two
    answers with the time an hour or more apart give the bin its rate: hours later, with no time
    sent since, its clock is off by the sleeps' jitter, not by 36 s an hour; backlogged readings'
    ages are corrected by the same rate."""
    dev = make_device(wake_s=3600, report_s=3600, listen_every=1)
    dev.drift_rtc(7)
    rate = dev.rtc_drift.rate
    gw = Gateway(dev)
    run(dev, 8)  # answered windows an hour apart: the clock set eight times
    assert abs(rtc(dev).clock_ppm - rate * 1e6) < 2000, (rtc(dev).clock_ppm, rate)
    gw.time = False
    run(dev, 5)
    s = rtc(dev)
    woken = dev.clock_ref[0]  # as it wakes next: the RTC has counted that sleep too
    error_s = state.wall_ms(s, int((woken + dev.hw.rtc_error_s) * 1000)) / 1000.0 - woken
    assert abs(error_s) < 15.0 < rate * 6 * 3600, (error_s, rate)  # uncorrected: six hours at 0.5-1 %


def test_once_its_rate_is_measured_a_bin_listens_every_nth_report_even_at_zero_ppm(make_device):
    """An RTC that keeps true time asleep measures 0 ppm: a rate all the same. After its first
    two answers with the time the bin listens every listen_every-th report, not at every one."""
    dev = make_device(listen_every=6)
    dev.sensor.p_no_echo = dev.sensor.p_spurious = 0.0
    Gateway(dev)
    run(dev, 16)
    s = rtc(dev)
    assert s.dl & state.DL_RATE and abs(s.clock_ppm) < 50
    flagged = [bool(f[10] & downlink.F_LISTENING) for f in dev.frames() if f[0] & 0x0F == codec.T_READING][-12:]
    assert sum(flagged) == 2, flagged


def test_the_gateways_pace_spaces_the_bins_regular_windows(make_device):
    """A gateway with many bins to answer gives each a pace (firmware 1.6.0): told 120 minutes, a
    bin reporting every 15 minutes opens its regular window every eighth report, not every
    listen_every-th, and keeps the pace through deep sleep; told nothing, it keeps listen_every."""
    dev = make_device(listen_every=2)
    dev.sensor.p_no_echo = dev.sensor.p_spurious = 0.0
    Gateway(dev, pace=120)
    run(dev, 40)
    assert rtc(dev).pace_min == 120
    flagged = [bool(f[10] & downlink.F_LISTENING) for f in dev.frames() if f[0] & 0x0F == codec.T_READING][-24:]
    assert sum(flagged) == 3 and flagged.index(True) < 8, flagged
    again = make_device(seed=2, listen_every=2)
    again.sensor.p_no_echo = again.sensor.p_spurious = 0.0
    Gateway(again)
    run(again, 40)
    flagged = [bool(f[10] & downlink.F_LISTENING) for f in again.frames() if f[0] & 0x0F == codec.T_READING][-24:]
    assert rtc(again).pace_min == 0 and sum(flagged) == 12, flagged


def test_a_bin_asks_before_its_unacknowledged_readings_outgrow_an_answer(make_device):
    """With a pace of a week, a bin still opens a window before readings sent since its last
    answer would be taken as delivered unjudged (UNCONFIRMED_CAP) or fall out of the ack bitmap's
    32 counters; every reading lost on air in between (one frame in five) is sent again and stored."""
    dev = make_device(listen_every=2)
    dev.sensor.p_no_echo = dev.sensor.p_spurious = 0.0
    gw = Gateway(dev, pace=downlink.PACE_MIN[1])
    run(dev, 6)  # the clock set, its rate learnt: from here only the pace and the reach ask
    first = max(gw.stored)

    class EveryFifth:
        def __contains__(self, fcnt):
            return fcnt > first and fcnt % 5 == 0

    gw.lose = EveryFifth()
    run(dev, 60)
    flagged = [d["fcnt"] for f, d in zip(dev.frames(), decoded(dev))
               if d["type"] == "reading" and d["fcnt"] > first and f[10] & downlink.F_LISTENING]
    assert len(flagged) >= 2 and all(b - a <= 32 for a, b in zip([first] + flagged, flagged)), flagged
    made = sorted(r["fcnt"] for r in decoded(dev) if r["type"] == "reading" and r["fcnt"] > first)
    got = {r["fcnt"] for d in gw.stored.values() for r in ([d] if d["type"] == "reading" else d.get("readings", []))}
    judged = [c for c in made if c < flagged[-1]]  # readings an answer has judged by now
    assert any(c % 5 == 0 for c in judged) and not [c for c in judged if c not in got]


def test_told_to_echo_a_bin_repeats_its_last_unacknowledged_reading_so_a_lost_frame_costs_no_answer(make_device):
    """Firmware 1.7.0: after an answer with `echo 1` each reading frame repeats the newest reading
    not yet acknowledged, with its age. Every third frame lost on air between windows a week apart:
    told to echo, every lost reading is stored by the next report, long before an answer could show
    it missing; not told (a gateway that cannot read echoes), they wait for that answer."""
    stored = {}
    for echo in (1, None):
        dev = make_device(listen_every=2)
        dev.sensor.p_no_echo = dev.sensor.p_spurious = 0.0
        gw = Gateway(dev, pace=downlink.PACE_MIN[1], echo=echo)
        run(dev, 6)  # the clock set, its rate learnt: from here only the pace and the reach ask
        first = max(gw.stored)
        gw.lose = {c for c in range(first + 1, first + 20) if c % 3 == 0}
        run(dev, 12)
        made = sorted(d["fcnt"] for d in decoded(dev) if d["type"] == "reading" and d["fcnt"] > first)
        assert len(made) == 12 and all(b - a == 1 for a, b in zip(made, made[1:])), made  # no window, no hello between
        lost = [c for c in made[:-1] if c in gw.lose]
        stored[echo] = (lost, [c for c in lost if c in readings_at(gw)])
        if echo:
            frames = [f for f in dev.frames() if f[0] & 0x0F == codec.T_READING][-12:]
            assert all(len(f) == 25 and f[0] >> 4 == 2 for f in frames)
            later = [d for d in gw.stored.values() if d["fcnt"] > first + 1]
            assert later and all(d["echoes"][0]["fcnt"] == d["fcnt"] - 1 and 14 <= d["echoes"][0]["age_min"] <= 16
                                 for d in later), later
        assert len(lost) >= 3
    assert stored[1][1] == stored[1][0] and stored[None][1] == [], stored


def test_told_two_echoes_a_bin_loses_no_reading_to_two_lost_frames_in_a_row(make_device):
    """`echo 2` (a gateway that saw readings go missing in spite of their echo): each reading frame
    repeats the two newest unacknowledged readings, oldest first (34 bytes), so two frames lost in
    a row cost nothing either."""
    dev = make_device(listen_every=2)
    dev.sensor.p_no_echo = dev.sensor.p_spurious = 0.0
    gw = Gateway(dev, pace=downlink.PACE_MIN[1], echo=2)
    run(dev, 6)
    first = max(gw.stored)
    gw.lose = {c for c in range(first + 1, first + 12) if c % 4 in (0, 1)}  # pairs in a row
    run(dev, 12)
    made = sorted(d["fcnt"] for d in decoded(dev) if d["type"] == "reading" and d["fcnt"] > first)
    lost = [c for c in made[:-2] if c in gw.lose]
    assert len(lost) >= 4 and set(lost) <= readings_at(gw), (lost, sorted(readings_at(gw)))
    later = [d for d in gw.stored.values() if d["fcnt"] > first + 2]
    assert later and all(len(d["echoes"]) == 2 and [e["fcnt"] for e in d["echoes"]] == [d["fcnt"] - 2, d["fcnt"] - 1]
                         for d in later), later
    assert all(len(f) == 34 for f in dev.frames()[-6:] if f[0] & 0x0F == codec.T_READING)


def test_a_flipped_bit_in_rtc_memory_asking_for_three_echoes_costs_no_reading(make_device):
    """The echo count lives in RTC memory, which is read back, not trusted: a bit flipped there to
    ask for three (a frame holds two at most) still sends the reading, with two."""
    dev = make_device(listen_every=2)
    dev.sensor.p_no_echo = dev.sensor.p_spurious = 0.0
    gw = Gateway(dev, pace=downlink.PACE_MIN[1], echo=2)
    run(dev, 6)
    s = rtc(dev)
    s.dl |= state.DL_ECHO  # both bits: three
    dev.hw.esp.rtc = s.pack()
    before = max(gw.stored)
    run(dev, 1)
    sent = [d for d in decoded(dev) if d["type"] == "reading" and d["fcnt"] > before]
    assert len(sent) == 1 and len(sent[0]["echoes"]) == 2 and sent[0]["fcnt"] in gw.stored, sent


def test_readings_lost_before_a_bins_first_answer_wait_for_it_and_a_gateway_that_never_answers_costs_no_window(make_device):
    """Firmware 1.7.0: a bin no gateway has answered yet keeps what it sent for its first answer to
    judge (before, a silent window made it take them as delivered: as a fleet is installed a busy
    gateway answers the new bins over hours, and one reading in fifty was lost for good). To a
    gateway that never answers (a receive-only radio) it listens every (listen_every + 1) // 2-th
    report after a silent window (a gateway that has answered once: every listen_every-th; sooner
    helps a bin that a busy gateway has not answered yet: its list of 24 would overflow), keeps
    UNCONFIRMED_CAP readings and sends each once, whereas a bin that has heard a gateway sends a
    reading that leaves its full list again."""
    dev = make_device(listen_every=3)
    dev.sensor.p_no_echo = dev.sensor.p_spurious = 0.0
    gw = Gateway(dev)
    gw.make = lambda fcnt, up: None  # a busy gateway: no answer yet
    gw.lose = {2, 5, 6}
    run(dev, 8)
    assert not rtc(dev).dl & state.DL_HEARD and {2, 5, 6} <= {e[1] for e in rtc(dev).unconfirmed}
    gw.make = None
    run(dev, 6)  # the first answer shows them missing; they go again
    assert sent_readings(dev) - {f for f in sent_readings(dev) if f > gw.answers[-1][0]} <= readings_at(gw)
    assert {2, 5, 6} <= readings_at(gw)
    never = make_device(seed=3, listen_every=3)
    never.sensor.p_no_echo = never.sensor.p_spurious = 0.0
    Gateway(never).make = lambda fcnt, up: None
    run(never, 60)
    flagged = [bool(f[10] & downlink.F_LISTENING) for f in never.frames() if f[0] & 0x0F == codec.T_READING]
    assert len(flagged) == 60 and sum(flagged[4:]) == 28, flagged  # every second report
    assert len(rtc(never).unconfirmed) == state.UNCONFIRMED_CAP and not rtc(never).backlog
    assert not [d for d in decoded(never) if d["type"] == "backlog"]  # every reading sent once
    s = rtc(never)
    s.dl |= state.DL_HEARD
    state.push_unconfirmed(s, s.fcnt, s.fcnt, 0, bytes(6))
    assert len(s.unconfirmed) == state.UNCONFIRMED_CAP and len(s.backlog) == 1  # heard: the oldest goes again


@given(st.lists(st.integers(0, 10 ** 6), unique=True, max_size=3 * state.BACKLOG_CAP))
def test_the_backlog_keeps_the_newest_readings_whatever_order_they_come_back_in(counters):
    s = state.State()
    for c in counters:
        state.push_backlog(s, c, 0, bytes(6))
    kept = [e[0] for e in s.backlog]
    assert kept == sorted(counters)[-state.BACKLOG_CAP:]
    assert s.dropped == max(0, len(counters) - state.BACKLOG_CAP)


@pytest.mark.parametrize("transport", ["e22", "rylr998"])
def test_the_time_command_sets_the_bins_clock(make_device, transport):
    """The bin's RTC is 1234.5 s off; one answered window later its wall clock (RTC + offset) is
    within 50 ms of the truth, and stays so through deep sleep."""
    dev = make_device(transport=transport)
    dev.hw.rtc_error_s = -1234.5
    gw = Gateway(dev)
    run(dev, 1)
    assert gw.answers
    for _ in range(2):
        s = rtc(dev)
        assert s.clock_at != 0
        bin_ms = (dev.hw.epoch() + dev.hw.rtc_error_s) * 1000.0 + s.clock_ms
        err = bin_ms - dev.hw.epoch() * 1000.0
        assert abs(err) < 50.0, err
        gw.time = False
        run(dev, 1)
