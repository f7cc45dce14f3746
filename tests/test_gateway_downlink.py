"""The gateway answers bins that listen (issue 20): a real gateway process, real pseudo-terminals
(pyserial), a real Mosquitto; what the gateway writes back is read from the pty's other end and
checked with the bin's own parser (binlink.wire.downlink.parse) under the bin's key."""
import json
import os
import select
import subprocess
import time
import types

import pytest
from hypothesis import assume, given, strategies as st

from binlink.wire import codec, downlink, framing
from binlink.gateway import module_formats, registry, registry_settings
from binlink.gateway.clock import clock_synced
from binlink.gateway.metrics import Metrics
from tests.harness import BINLINK, KEY, KEY2, GatewayProcess, decoded, wait_for

DEV_A, DEV_B = 0xA1, 0xB2
DEVICES = [(DEV_A, "bin-a", KEY, 1200, 200), (DEV_B, "bin-b", KEY2, 1000, 100)]
LISTEN = downlink.F_LISTENING


def reading(n, flags=0, dev=DEV_A, key=KEY):
    return codec.encode_reading(key, dev, n, 700, 20, 3700, flags, 5, 5)


class Radio:
    """The radio's side of the pty: what the gateway writes to its module, read as it comes."""

    def __init__(self, pty):
        self.pty = pty
        self.buf = b""

    def read_until(self, done, timeout=10.0, what="bytes from the gateway"):
        deadline = time.monotonic() + timeout
        while not done(self.buf):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out waiting for %s; got %r" % (what, self.buf))
            ready, _, _ = select.select([self.pty.master], [], [], left)
            if ready:
                self.buf += os.read(self.pty.master, 4096)
        return self.buf

    def frames(self, n, timeout=10.0):
        """The first n COBS+CRC frames the gateway wrote (raw / raw+rssi format)."""
        def deframed(buf):
            out = [body for kind, body, _ in framing.Deframer().feed(buf) if kind == "frame"]
            return out if len(out) >= n else None
        self.read_until(deframed, timeout, "%d downlink frames" % n)
        return deframed(self.buf)


def gateway(tmp_path, broker, pty, fmt="raw", answer_within_ms=5000, **keys):
    """A gateway process with these [[source]] keys. The answers' deadline is the bins' 200 ms in
    service; the tests here check what is written (test_an_answer_past_the_window_is_skipped, when)."""
    g = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, fmt)], devices=DEVICES)
    keys["answer_within_ms"] = answer_within_ms
    with open(g.config) as f:
        text = f.read()
    with open(g.config, "w") as f:
        f.write(text.replace('format = "%s"' % fmt, 'format = "%s"\n' % fmt + "\n".join("%s = %s" % kv for kv in keys.items())))
    return g.start()


@pytest.fixture
def gw(tmp_path, broker, pty):
    g = gateway(tmp_path, broker, pty)
    yield g
    if g.alive():
        g.kill()


def expect_answer(radio, answered, key=KEY, dev=DEV_A, index=0):
    """The index-th frame written, parsed as the bin that sent uplink `answered` would."""
    frame = radio.frames(index + 1)[index]
    return downlink.parse(frame, key, dev, answered)


def settings_state(subscriber, bin_id="bin-a"):
    msgs = subscriber.json("bin/%s/settings" % bin_id)
    return msgs[-1] if msgs else None


def test_a_listening_uplink_is_answered_with_what_was_stored_and_others_are_not(gw, pty, subscriber):
    radio = Radio(pty)
    for n in (1, 2):  # not listening: no answer
        pty.write(framing.frame(reading(n)))
    pty.write(framing.frame(reading(4, flags=LISTEN)))  # 3 was lost on air
    got = expect_answer(radio, 4)  # the first thing written answers 4: nothing was sent for 1 and 2
    assert got["ack"] == 0b1101  # 4, 2 and 1 stored; 3 not
    assert "config" not in got  # no desired settings in the registry: the bin is left alone
    assert ("time_ms" in got) == clock_synced()  # the gateway's clock only when the kernel says it is synced
    if "time_ms" in got:
        assert abs(got["time_ms"] / 1000 - time.time()) < 5
    # the bin resends 3 in a backlog batch and listens again: 3 is acknowledged now
    body = codec.pack_reading(650, 20, 3700, LISTEN, 5, 5)
    pty.write(framing.frame(codec.encode_backlog(KEY, DEV_A, 6, [(3, 30, body)])))
    got = expect_answer(radio, 6, index=1)
    assert got["ack"] & 0b111111 == 0b111101  # 6 (the batch), 4, 3, 2, 1; 5 never sent
    wait_for(lambda: gw.metric("binlink_downlinks_sent_total", kind="ack") == 2, what="2 downlinks counted")
    # an uplink of another bin without the flag, then bin-a again: still nothing more than the answers
    pty.write(framing.frame(reading(1, dev=DEV_B, key=KEY2)))
    pty.write(framing.frame(reading(7, flags=LISTEN)))
    assert expect_answer(radio, 7, index=2)["ack"] & 0x7F == 0b1111011  # the batch (6) is a stored frame too
    wait_for(lambda: len(subscriber.events()) == 6, what="every reading published")
    assert KEY.hex() not in gw.output() and KEY2.hex() not in gw.output()


def test_a_170_bin_is_asked_to_echo_and_a_reading_its_frame_lost_arrives_with_the_next(gw, pty, subscriber):
    """Through the gateway process and its pty: a bin whose hello names 1.7.0 is told `echo 1`; its
    next frame carries the reading lost on air before it, which is published (as late) and
    acknowledged, and counted in binlink_echo_saved; an echo of a reading stored already is not a
    duplicate."""
    radio = Radio(pty)
    pty.write(framing.frame(codec.encode_hello(KEY, DEV_A, 1, (1, 7, 0), 1, b"\x00\x00\x00\x01")))
    pty.write(framing.frame(reading(2, flags=LISTEN)))
    assert expect_answer(radio, 2)["echo"] == 1
    body = lambda dist, flags=0: codec.pack_reading(dist, 20, 3700, flags, 5, 5)  # noqa: E731
    # 3 is lost on air; 4 repeats it, and asks for an answer
    pty.write(framing.frame(codec.encode_reading_body(KEY, DEV_A, 4, body(640, LISTEN), [(3, 15, body(660))])))
    got = expect_answer(radio, 4, index=1)
    assert got["ack"] & 0b111 == 0b111 and "echo" not in got  # 4, 3 (by its echo) and 2; it echoes already
    pty.write(framing.frame(codec.encode_reading_body(KEY, DEV_A, 5, body(620), [(4, 15, body(640))])))
    published = wait_for(lambda: (m := subscriber.events()) and len(m) == 4 and m, what="4 readings published")
    assert [(m["fcnt"], m["distance_mm"], m["backlog"]) for m in published] == [(2, 700, False), (3, 660, True), (4, 640, False),
                                                                             (5, 620, False)]
    wait_for(lambda: gw.metric("binlink_echo_saved_total") == 1, what="the echo counted")
    assert gw.metric("binlink_duplicates_total") == 0


def test_registry_set_reaches_the_bin_and_its_report_shows_in_sync(gw, pty, subscriber, tmp_path):
    radio = Radio(pty)
    r = subprocess.run([BINLINK, "registry", "--registry", gw.registry, "set", "bin-a", "report_s=1800", "fire_c=60"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    gw.proc.send_signal(1)  # SIGHUP: systemctl reload
    want = registry_settings.desired_hash(registry.load(gw.registry).by_bin("bin-a"))
    state = wait_for(lambda: settings_state(subscriber), what="desired settings on MQTT")
    assert state["desired"]["report_s"] == 1800 and state["desired"]["fire_c"] == 60
    assert state["desired"]["wake_s"] == 900  # the firmware's default for what the registry does not set
    assert state["desired_hash"] == want and state["in_sync"] is None and state["reported_hash"] is None
    wait_for(lambda: "registry reloaded" in gw.output(), what="reload")
    pty.write(framing.frame(reading(1, flags=LISTEN)))
    got = expect_answer(radio, 1)
    want_hash, settings = got["config"]
    assert want_hash.hex() == want
    assert settings["report_s"] == 1800 and settings["fire_c"] == 60  # the registry's own first
    # the bin applies them and says so in its hello (firmware 1.4.0: the settings hash)
    pty.write(framing.frame(codec.encode_hello(KEY, DEV_A, 2, (1, 4, 0), 4, bytes.fromhex(want))))
    synced = wait_for(lambda: (s := settings_state(subscriber)) and s["in_sync"] and s, what="in_sync on MQTT")
    assert synced["reported_hash"] == want and synced["fw_version"] == "1.4.0"
    pty.write(framing.frame(reading(3, flags=LISTEN)))
    assert "config" not in expect_answer(radio, 3, index=1)  # in sync: nothing to change
    # a restart keeps the bin's report: still in sync, no config sent
    gw.terminate()
    gw.start()
    pty.write(framing.frame(reading(4, flags=LISTEN)))
    assert "config" not in expect_answer(radio, 4, index=2)
    assert gw.metric("binlink_downlinks_sent_total", kind="config") == 0  # counted by the new process
    # a bin reporting other settings is out of sync on MQTT, and gets the config again
    pty.write(framing.frame(codec.encode_hello(KEY, DEV_A, 5, (1, 4, 0), 4, b"\x00\x00\x00\x01")))
    wait_for(lambda: settings_state(subscriber)["in_sync"] is False, what="in_sync false")
    pty.write(framing.frame(reading(6, flags=LISTEN)))
    assert expect_answer(radio, 6, index=3)["config"][0].hex() == want
    assert KEY.hex() not in json.dumps(subscriber.json("bin/bin-a/settings"))


def test_rylr998_answer_is_an_at_send_to_the_sender(tmp_path, broker, pty):
    g = gateway(tmp_path, broker, pty, fmt="rylr998")
    try:
        radio = Radio(pty)
        pty.write(module_formats.rylr998_line(reading(1, flags=LISTEN), addr=7))
        line = radio.read_until(lambda b: b"\r\n" in b, what="an AT+SEND line")
        head, _, data = line.split(b"\r\n")[0].partition(b",")[2].partition(b",")
        assert line.startswith(b"AT+SEND=7,") and int(head) == len(data)
        assert data == data.upper()  # hex as the bins send theirs
        got = downlink.parse(bytes.fromhex(data.decode()), KEY, DEV_A, 1)
        assert got["ack"] & 1
    finally:
        g.kill()


def test_over_the_duty_cycle_the_gateway_stays_silent_and_counts_it(tmp_path, broker, pty):
    # 0.1 %: a budget of 600 ms of airtime; each answer at SF12 takes ~1 s: the first is over it
    g = gateway(tmp_path, broker, pty, sf=12, duty_cycle=0.001)
    try:
        pty.write(framing.frame(reading(1, flags=LISTEN)))
        wait_for(lambda: g.metric("binlink_downlinks_skipped_total", reason="duty_cycle") == 1, what="skip counted")
        assert g.metric("binlink_downlinks_sent_total") == 0
        assert not select.select([pty.master], [], [], 0)[0]  # nothing written to the radio
    finally:
        g.kill()


def test_an_invalid_setting_is_refused_with_one_line_and_nothing_changes(tmp_path):
    path = str(tmp_path / "devices.toml")
    registry.add(path, DEV_A, "bin-a", KEY, 1200, 200)
    before = open(path).read()
    for words, says in ((["bin-a", "fire_c=200"], "fire_c: 200 outside 40..100"),
                        (["bin-a", "report_s=600"], "report_s 600 is shorter than wake_s 900"),
                        (["bin-a", "colour=3"], "colour: not a setting"),
                        (["bin-a", "fire_c=hot"], "must be a whole number"),
                        (["bin-*", "nope-*", "fire_c=50"], "nope-*: no bin")):
        r = subprocess.run([BINLINK, "registry", "--registry", path, "set"] + words, capture_output=True, text=True)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert open(path).read() == before
    r = subprocess.run([BINLINK, "registry", "--registry", path, "set", "--all", "report_s=1800", "wake_s=600"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert dict(registry.load(path).by_bin("bin-a").settings) == {"report_s": 1800, "wake_s": 600}


def test_a_write_error_is_counted_and_never_raises(tmp_path):
    """A radio whose port is gone: the answer is counted as a write error, the service carries on."""
    from binlink.gateway import config, downlink as gw_downlink
    from binlink.gateway.serial_input import SerialSource
    from binlink.gateway.uplink import Reading, Uplink

    metrics = Metrics()
    src = SerialSource(config.Source("radio0", "/nonexistent"), None, metrics, None)
    cfg = types.SimpleNamespace(base_topic="binlink/t")
    answerer = gw_downlink.Answerer(cfg, metrics, [src], str(tmp_path))
    device = registry.Device(DEV_A, "bin-a", KEY, 1200, 200)
    up = Uplink("radio0", module_formats.Reception(reading(5, flags=LISTEN)), time.time(), device=device, fcnt=5,
                frame_type=codec.T_READING, readings=[Reading(5, 0, 700, 20, 3700, LISTEN, 5, 5)])
    pipeline = types.SimpleNamespace(listening=[up], storage=types.SimpleNamespace(full=False), clock=time.time,
                                     counters={DEV_A: 5}, stored={DEV_A: 1}, time_synced=False, outbox=None)
    answerer.after_commit(pipeline)  # the port is not open: send() fails
    assert metrics.value("binlink_downlink_write_errors_total") == 1
    assert metrics.value("binlink_downlinks_sent_total", kind="ack") == 0
    import serial

    class Broken:
        def write(self, data):
            raise serial.SerialTimeoutException("Write timeout")
    src._port = Broken()
    pipeline.listening = [up]
    answerer.after_commit(pipeline)
    assert metrics.value("binlink_downlink_write_errors_total") == 2
    answerer.close()


def test_a_module_that_stops_reading_costs_one_write_timeout_not_one_per_answer(monkeypatch):
    """A real pseudo-terminal through pyserial whose other end (the module) stops reading: the
    kernel's buffer fills and a write blocks. The first such write fails after WRITE_TIMEOUT_S;
    the answers after it are refused at once (the pipeline's thread writes them: a wedged module
    must not slow reception), until WEDGED_S has passed and the module reads again."""
    import os
    import queue
    import threading

    from binlink.gateway import config, serial_input

    monkeypatch.setattr(serial_input, "WEDGED_S", 1.0)
    master, slave = os.openpty()
    stop = threading.Event()
    src = serial_input.SerialSource(config.Source("radio0", os.ttyname(slave)), queue.Queue(), Metrics(), stop)
    src.start()
    try:
        assert src.connected.wait(5)
        chunk = bytes(range(1, 256))
        t0 = time.monotonic()
        while src.send(chunk):  # nobody reads the module's end
            assert time.monotonic() - t0 < 30, "the pty never filled"
        blocked_at = time.monotonic()
        refused = [src.send(chunk) for _ in range(20)]
        assert refused == [False] * 20 and time.monotonic() - blocked_at < 0.2
        while select.select([master], [], [], 0.05)[0]:  # the module reads its UART again
            os.read(master, 65536)
        time.sleep(1.1)
        assert src.send(b"\x00answer\x00")
    finally:
        stop.set()
        src.join(5)
        os.close(master)
        os.close(slave)


def test_the_gateway_knows_the_firmware_defaults():
    from binlink.firmware import config as fw_config

    assert registry_settings.FIRMWARE_DEFAULTS == {n: fw_config.DEFAULTS[n] for n in downlink.SETTING_IDS}
    assert not downlink.setting_problems(registry_settings.FIRMWARE_DEFAULTS)


def test_ack_bitmap_reads_the_stored_window_at_the_answered_counter():
    from binlink.gateway.downlink import ack_bitmap

    stored = 0b1011  # head 10: 10, 9 and 7 stored
    assert ack_bitmap(10, stored, 10) == 0b1011
    assert ack_bitmap(10, stored, 9) == 0b101  # answered 9: 9, 7
    assert ack_bitmap(300, stored, 9) == 1  # beyond the window: only the answered uplink itself
    assert ack_bitmap(10, stored, 10, frames=[8, 10, 3, 11]) == 0b1111 | 1 << 7  # batches and hellos committed


NAMES = sorted(downlink.SETTING_IDS)


@given(st.dictionaries(st.sampled_from(NAMES), st.integers(0, 10**9)))
def test_key_value_words_round_trip(settings):
    words = ["%s=%d" % kv for kv in settings.items()]
    assert registry_settings.parse_assignments(words) == settings


@given(st.lists(st.text(max_size=30), max_size=5))
def test_any_words_give_settings_or_one_clear_error(words):
    try:
        got = registry_settings.parse_assignments(words)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert set(got) <= set(NAMES)
    assert all(v is None or (type(v) is int and v >= 0) for v in got.values())


def test_with_several_gateways_only_the_one_that_published_a_reading_answers(tmp_path, broker, subscriber):
    from tests.harness import RedisServer
    from tests.test_multi_gateway import MARKER, Site

    server = RedisServer(tmp_path).start()
    site = Site(tmp_path, broker, server, 0)
    try:
        for _ in range(2):
            g, _ = site.add(devices=DEVICES + [MARKER], start=False)
            with open(g.config) as f:
                text = f.read()
            with open(g.config, "w") as f:
                f.write(text.replace('format = "raw"', 'format = "raw"\nanswer_within_ms = 5000'))
            g.start()
        for n in range(1, 7):  # both gateways hear every frame
            site.hear(reading(n, flags=LISTEN), [0, 1])
        wait_for(lambda: len({e["message_id"] for e in subscriber.events() if e["bin_id"] == "bin-a"}) == 6,
                 what="6 readings published")
        wait_for(lambda: site.total("binlink_duplicates_total") == 6, what="each heard twice, stored once")
        wait_for(lambda: site.total("binlink_downlinks_sent_total", kind="ack") == 6, what="6 answers")
        publisher = {e["fcnt"]: e["gateway"] for e in subscriber.events() if e["bin_id"] == "bin-a"}
        for i, link in enumerate(site.links):
            written = b""
            while select.select([link.master], [], [], 0)[0]:
                written += os.read(link.master, 4096)
            frames = [body for kind, body, _ in framing.Deframer().feed(written) if kind == "frame"]
            answered = sorted(int.from_bytes(f[4:6], "big") for f in frames)
            assert answered == sorted(n for n, g in publisher.items() if g == "gw%d" % i)
            for f in frames:
                assert downlink.parse(f, KEY, DEV_A, int.from_bytes(f[4:6], "big"))["ack"] & 1
    finally:
        site.close()
        server.stop()


def test_a_damaged_reported_settings_file_is_set_aside_not_a_crash(tmp_path):
    from binlink.gateway.downlink import Reported

    path = tmp_path / "downlink.sqlite"
    path.write_bytes(b"not a database" * 100)
    r = Reported(str(path))
    assert r.rows == {} and (tmp_path / "downlink.sqlite.damaged").exists()
    r.save(DEV_A, ("0badf00d", "1.4.0", 1.0), "{}")
    r.close()
    assert Reported(str(path)).get(DEV_A) == ("0badf00d", "1.4.0", 1.0)  # kept across a restart


class Capture:
    """A radio writer that keeps what it is given (the Answerer's side of SerialSource.send)."""

    def __init__(self, name="radio0", **source):
        from binlink.gateway import config

        self.source = config.Source(name, "/dev/null", **source)
        self.sent = []

    def send(self, data):
        self.sent.append(data)
        return True


def answering(tmp_path, device, fcnts, writer, synced=True, received_at=None, fw=None, frame=b""):
    """Answers one listening reading per counter with a stand-in pipeline; returns the downlinks
    parsed. fw: the firmware version the bin's last hello named (None: no hello heard); frame: the
    uplink's bytes as heard."""
    from binlink.gateway import downlink as gw_downlink
    from binlink.gateway.uplink import Reading, Uplink

    answerer = gw_downlink.Answerer(types.SimpleNamespace(base_topic="binlink/t"), Metrics(), [writer], str(tmp_path))
    if fw is not None:
        answerer.reported.rows[device.device_id] = [("00000000", fw, 0.0), None]
    out = []
    for n in fcnts:
        up = Uplink("radio0", module_formats.Reception(frame), received_at or time.time(), device=device, fcnt=n,
                    frame_type=codec.T_READING, readings=[Reading(n, 0, 700, 20, 3700, LISTEN, 5, 5)])
        pipeline = types.SimpleNamespace(listening=[up], storage=types.SimpleNamespace(full=False), clock=time.time,
                                         counters={device.device_id: n}, stored={device.device_id: 1},
                                         time_synced=synced, outbox=None)
        before = len(writer.sent)
        answerer.after_commit(pipeline)
        out.append(downlink.parse(framing.Deframer().feed(writer.sent[-1])[0][1], device.key, device.device_id, n)
                   if len(writer.sent) > before else None)
    answerer.close()
    return out, answerer.metrics


def test_time_only_from_a_synced_clock_and_a_config_in_turns_until_the_bin_reports_it(tmp_path):
    table = (("fire_c", 60), ("near_full_pct", 80), ("report_s", 1800))
    device = registry.Device(DEV_A, "bin-a", KEY, 1200, 200, settings=table)
    got, metrics = answering(tmp_path, device, [1, 2, 3], Capture())
    assert all(abs(g["time_ms"] / 1000 - time.time()) < 2 for g in got)
    first, second = got[0]["config"][1], got[1]["config"][1]
    assert set(dict(table)) <= set(first)  # what the operator asked for goes first
    assert {**first, **second} == registry_settings.desired(device)  # two answers carry the whole desired set
    assert got[2]["config"][1] == first and all(g["config"][0].hex() == registry_settings.desired_hash(device) for g in got)
    assert metrics.value("binlink_downlinks_sent_total", kind="config") == 3
    unsynced, _ = answering(tmp_path / "b", device, [1], Capture(), synced=False)
    assert "time_ms" not in unsynced[0]


def valid_table(data):
    """A settings table the bin would take (drawn setting by setting within its range)."""
    names = data.draw(st.sets(st.sampled_from(sorted(downlink.SETTING_IDS))))
    table = {n: data.draw(st.integers(*downlink.SETTINGS[downlink.SETTING_IDS[n]][1:])) for n in sorted(names)}
    assume(not registry_settings.combined_problems(table))
    return table


@given(st.data())
def test_a_bin_running_a_set_the_gateway_knows_is_sent_only_what_differs(data):
    """A change to a bin whose reported hash names a set the gateway knows (the firmware's
    defaults, a set it wanted before) carries only the settings that differ, and lands the bin on
    the desired set; an unknown hash gets the whole set."""
    from binlink.gateway import downlink as gw_downlink

    running = registry_settings.desired_from(valid_table(data))
    table = valid_table(data)
    device = registry.Device(DEV_A, "bin-a", KEY, 1200, 200, settings=registry_settings.parse(table))
    want = registry_settings.desired(device)
    assume(table and want != running)  # an empty table: the registry wants nothing of the bin
    chunks = gw_downlink.config_chunks(device, running)
    sent = {n: v for c in chunks for n, v in c.items()}
    assert {**running, **sent} == want
    assert sent == {n: v for n, v in want.items() if running[n] != v}
    assert all(0 < len(c) <= downlink.MAX_SETTINGS for c in chunks)
    known = registry_settings.KnownSets()
    known.add(running)
    reported = downlink.settings_hash(running).hex()
    turns = [gw_downlink.config_command(device, reported, t, known)[1] for t in range(len(chunks))]
    assert turns == chunks
    unknown = gw_downlink.config_chunks(device, None)
    assert {n: v for c in unknown for n, v in c.items()} == want


def test_a_change_to_a_bin_on_the_defaults_is_one_setting_in_one_answer():
    from binlink.gateway import downlink as gw_downlink

    device = registry.Device(DEV_A, "bin-a", KEY, 1200, 200, settings=(("fire_c", 65),))
    defaults = downlink.settings_hash(registry_settings.FIRMWARE_DEFAULTS).hex()
    want_hash, change = gw_downlink.config_command(device, defaults, 0, registry_settings.KnownSets())
    assert change == {"fire_c": 65} and want_hash.hex() == registry_settings.desired_hash(device)


def test_the_pace_grows_with_the_bins_a_radio_answers(tmp_path):
    """Their regular answers take half of the radio's 1 % budget: 1,000 bins listen every ~12.6 h,
    100 every ~76 min; a bin not heard for 26 h no longer counts; a 1.6.0 bin is told its pace,
    an older one (which would refuse the answer) or one never heard saying hello is not."""
    from binlink.gateway import downlink as gw_downlink

    now = [1_790_000_000.0]
    radio = gw_downlink.Radio(Capture(), clock=lambda: now[0])
    assert radio.pace_min() == downlink.PACE_MIN[0]
    paces = {}
    for n in (100, 1000):
        radio.heard = {dev: now[0] for dev in range(n)}
        paces[n] = radio.pace_min()
        regular_ms_per_h = n * 60.0 / paces[n] * radio.answer_ms
        assert 0.47 <= regular_ms_per_h / (0.01 * 3600000) <= 0.5, (n, paces[n])
    assert 70 <= paces[100] <= 80 and 700 <= paces[1000] <= 800, paces
    now[0] += 27 * 3600
    radio.heard[5000] = now[0]
    assert radio.pace_min() == downlink.PACE_MIN[0]
    device = registry.Device(DEV_A, "bin-a", KEY, 1200, 200)
    for fw, told in (("1.6.0", True), ("1.5.0", False), (None, False)):
        got, _ = answering(tmp_path / str(fw), device, [1], Capture(), fw=fw)
        assert ("pace_min" in got[0]) == told and got[0]["ack"] & 1, (fw, got)


def test_a_bin_that_can_echo_is_asked_to_until_its_readings_carry_one(tmp_path):
    """`echo 1` goes to a 1.7.0 bin answered on a reading frame without an echo; not to an older bin
    (which would refuse the whole answer), a bin never heard saying hello, or one whose readings
    echo already; nor in an answer full with four settings (the next one says it)."""
    from binlink.gateway import downlink as gw_downlink

    device = registry.Device(DEV_A, "bin-a", KEY, 1200, 200)
    body = codec.pack_reading(700, 20, 3700, 0, 5, 5)
    plain, echoing = codec.encode_reading_body(KEY, DEV_A, 1, body), codec.encode_reading_body(KEY, DEV_A, 2, body, [(1, 15, body)])
    for fw, frame, told in (("1.7.0", plain, True), ("1.6.2", plain, False), (None, plain, False), ("1.7.0", echoing, False)):
        got, _ = answering(tmp_path / ("%s-%d" % (fw, len(frame))), device, [1], Capture(), fw=fw, frame=frame)
        assert got[0].get("echo") == (1 if told else None) and got[0]["ack"] & 1, (fw, len(frame), got)
    four = (b"abcd", {"wake_s": 600, "report_s": 1800, "near_full_pct": 80, "fire_c": 60})
    assert gw_downlink.echo_command("1.7.0", plain, four) is None
    assert gw_downlink.echo_command("1.7.0", plain, (b"abcd", {"fire_c": 60})) == 1


def test_a_bin_losing_readings_in_spite_of_its_echo_is_asked_for_two_and_gets_half_the_pace():
    """A clear bit in the answer's ack below its highest set one: a reading went missing although
    the next frame repeated it. That bin is asked for two echoes (never fewer than it sends: an
    answer asking again costs bytes on air) and answered twice as often; counters older than the
    first the gateway stored (a bin it has just met) are not held against it."""
    from binlink.gateway import downlink as gw_downlink

    assert not gw_downlink.lossy(0xFFFFFFFF, 100) and not gw_downlink.lossy(0b111, 100)  # all stored; met 3 counters ago
    assert not gw_downlink.lossy(0b1111, 3) and gw_downlink.lossy(0b1011, 3) and gw_downlink.lossy(0xFFFFFFFD, 100)
    body = codec.pack_reading(700, 20, 3700, 0, 5, 5)
    one = codec.encode_reading_body(KEY, DEV_A, 40, body, [(39, 15, body)])
    two = codec.encode_reading_body(KEY, DEV_A, 40, body, [(38, 30, body), (39, 15, body)])
    assert gw_downlink.echoes_wanted(0xFFFFFFFF, 40, one) == 1 and gw_downlink.echoes_wanted(0xFFFFFFFB, 40, one) == 2
    assert gw_downlink.echoes_wanted(0xFFFFFFFF, 40, two) == 2  # never fewer than it sends
    assert gw_downlink.echo_command("1.7.0", one, None, 2) == 2 and gw_downlink.echo_command("1.7.0", two, None, 2) is None
    now = [1_790_000_000.0]
    radio = gw_downlink.Radio(Capture(), clock=lambda: now[0])
    radio.heard = {dev: now[0] for dev in range(1000)}
    assert abs(radio.pace_min(lossy=True) - radio.pace_min() * gw_downlink.LOSSY_PACE) <= 1, (radio.pace_min(), radio.pace_min(True))


def test_a_busy_radio_keeps_one_answer_for_a_bin_waiting_for_its_first_two():
    """A bin answered fewer than twice has no time, rate or pace yet: with one answer's airtime left
    in the budget only such a bin is answered; the others wait until there is more."""
    from binlink.gateway import downlink as gw_downlink

    now = [1_790_000_000.0]
    radio = gw_downlink.Radio(Capture(), clock=lambda: now[0])
    radio.budget_ms = radio.answer_ms * 1.5
    assert not radio.take(radio.answer_ms) and radio.take(radio.answer_ms, new=True)
    assert not radio.take(radio.answer_ms, new=True)  # and nothing beyond the budget for anyone
    now[0] += 3600
    assert radio.take(radio.answer_ms)


def test_a_restart_keeps_each_radios_pace(tmp_path):
    """The bins a radio heard are written down hourly (a crash loses at most an hour of them) and at
    close, and read back at start: after a restart the pace is what it was, not the 10 minutes of a
    radio that heard no bin, which would have a big fleet listen at every report until a day of
    hellos came in. Rows no writer makes are passed over; bins silent for 26 h are forgotten."""
    import sqlite3

    from binlink.gateway import downlink as gw_downlink
    from binlink.gateway.uplink import Reading, Uplink

    now = [1_790_000_000.0]
    device = registry.Device(DEV_A, "bin-a", KEY, 1200, 200)

    def answerer():
        return gw_downlink.Answerer(types.SimpleNamespace(base_topic="binlink/t"), Metrics(), [Capture()], str(tmp_path),
                                    clock=lambda: now[0])

    def hear(a, fcnt):  # a listening reading from bin-a, committed
        up = Uplink("radio0", module_formats.Reception(b""), now[0], device=device, fcnt=fcnt,
                    frame_type=codec.T_READING, readings=[Reading(fcnt, 0, 700, 20, 3700, LISTEN, 5, 5)])
        a.after_commit(types.SimpleNamespace(listening=[up], storage=types.SimpleNamespace(full=False), clock=lambda: now[0],
                                             counters={DEV_A: fcnt}, stored={DEV_A: 1}, time_synced=False, outbox=None))

    first = answerer()
    fleet = {dev: now[0] - 3600 for dev in range(0x100, 0x100 + 999)}
    first.radios["radio0"].heard.update(fleet)
    hear(first, 1)
    pace = first.radios["radio0"].pace_min()
    assert pace > 700
    now[0] += gw_downlink.HEARD_SAVE_S
    hear(first, 2)  # an hour on: written down, with no close (the power is cut)
    saved = {**fleet, DEV_A: now[0]}
    db = sqlite3.connect(str(tmp_path / "downlink.sqlite"))
    db.executemany("INSERT INTO heard VALUES (?,?,?)", [
        ("radio0", "a1", now[0]), ("radio0", 0x2000, "recently"), ("radio0", 0x2001, float("nan")),
        ("radio0", 0x2002, now[0] + 86400), ("radio0", -1, now[0]), ("radio0", 1 << 30, now[0]), ("radio0", 0x2003, None)])
    db.commit()
    db.close()

    second = answerer()
    assert second.radios["radio0"].heard == saved
    assert second.radios["radio0"].pace_min() == pace
    second.close()
    now[0] += gw_downlink.HEARD_S + 1  # a day and more without a bin heard
    assert answerer().radios["radio0"].pace_min() == downlink.PACE_MIN[0]


def test_an_answer_past_the_window_is_skipped(tmp_path):
    writer = Capture()  # the default deadline: 150 ms after the group began
    device = registry.Device(DEV_A, "bin-a", KEY, 1200, 200)
    got, metrics = answering(tmp_path, device, [1], writer, received_at=time.time() - 0.2)
    assert got == [None] and writer.sent == []
    assert metrics.value("binlink_downlinks_skipped_total", reason="late") == 1
    got, _ = answering(tmp_path / "b", device, [1], writer, received_at=time.time() - 0.05)
    assert got[0]["ack"] == 1


def test_a_wifi_bin_is_answered_on_its_topic_and_takes_its_settings(gw, broker, subscriber):
    """The real firmware with its Wi-Fi transport (CPython, part models) through a real Mosquitto to
    a real gateway: it listens after its cold boot's reading; the gateway answers on
    binlink/downlink/<device> with the registry's settings; the bin applies them, says so in a
    hello, and the settings topic shows it in sync."""
    import random
    import threading

    import paho.mqtt.client as mqtt

    from binlink.sim.device import SimDevice

    r = subprocess.run([BINLINK, "registry", "--registry", gw.registry, "set", "bin-b", "report_s=1800"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    gw.proc.send_signal(1)
    wait_for(lambda: "registry reloaded" in gw.output() and "taking Wi-Fi uplinks" in gw.output(), what="reload, Wi-Fi input")
    want = registry_settings.desired_hash(registry.load(gw.registry).by_bin("bin-b"))
    answers, arrived = [], threading.Event()
    net = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    net.on_message = lambda c, u, m: (answers.append((m.topic, m.payload)), arrived.set())
    net.connect("127.0.0.1", broker.port)
    net.subscribe("binlink/downlink/#")
    net.loop_start()
    clock = [time.time()]

    def to_broker(dev, payload, n):  # umqtt.simple's publish on the device: the broker has it, then the answer comes
        arrived.clear()
        info = net.publish("binlink/uplink", payload, qos=1)
        info.wait_for_publish(5)
        if payload[0] & 0x0F == codec.T_READING and payload[10] & LISTEN and arrived.wait(5):
            topic, frame = answers[-1]
            dev.hw.mqtt_deliver(topic, frame, dev.hw.now + 60.0)  # the bin's session reads it 60 ms on
        return info.is_published()

    dev = SimDevice(random.Random(5), DEV_B, KEY2, lambda: clock[0], transmit=to_broker, transport="wifi",
                    wifi_ssid="depot", mqtt_host="127.0.0.1", depth_mm=1000, full_mm=100)
    try:
        clock[0] += dev.wake()
        assert [t for t, _ in answers] == ["binlink/downlink/0000b2"]
        (asked,) = [f for f in dev.frames() if f[0] & 0x0F == codec.T_READING and f[10] & LISTEN]
        got = downlink.parse(answers[0][1], KEY2, DEV_B, codec.verify(asked, KEY2, None))
        assert got["config"][0].hex() == want and got["ack"] & 1
        hellos = [d for d in decoded(dev) if d["type"] == "hello"]
        assert len(hellos) == 2 and hellos[-1]["config_hash"] == want  # applied, and said so
        synced = wait_for(lambda: (s := settings_state(subscriber, "bin-b")) and s["in_sync"] and s, what="in_sync on MQTT")
        assert synced["reported_hash"] == want
        assert gw.metric("binlink_downlinks_sent_total", kind="config") == 1
    finally:
        net.loop_stop()
