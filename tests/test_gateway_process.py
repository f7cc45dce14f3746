"""The gateway as a product: its publisher process, failures that are never silent, what gets installed."""
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import zipfile

import pytest

from binlink.wire import codec, framing
from binlink.sim.broker import free_port
from tests.conftest import ROOT
from tests.harness import BINLINK, KEY, GatewayProcess, Subscriber, wait_for

DEVICES = [(0xA1, "bin-a", KEY, 1200, 200)]


def reading(n):
    return framing.frame(codec.encode_reading(KEY, 0xA1, n, 700, 20, 3700))


def children(pid):
    """Children of every thread of pid (the publisher is restarted from a monitor thread)."""
    out = []
    for path in glob.glob("/proc/%d/task/*/children" % pid):
        try:
            with open(path) as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:  # the thread ended between the listing and the read
            continue
    return out


def publisher_pid(gw):
    return wait_for(lambda: children(gw.proc.pid), what="publisher process")[0]


def pid_gone(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def test_publisher_is_its_own_process_and_dies_with_the_gateway(gw, broker, pty, subscriber):
    pid = publisher_pid(gw)
    assert "binlink.gateway.publisher_worker" in open("/proc/%d/cmdline" % pid).read()
    pty.write(reading(1))
    wait_for(lambda: len(subscriber.events()) == 1, what="published by the publisher process")
    gw.kill()  # SIGKILL: no clean shutdown, no chance to tell the child
    wait_for(lambda: pid_gone(pid), timeout=10, what="publisher gone with the gateway")
    # its connection died with it: the broker published the last will
    wait_for(lambda: subscriber.on("gateway/gw-test/status")[-1][1] == b"offline", what="last will")


def test_killed_publisher_is_restarted_and_nothing_is_lost(gw, pty, subscriber):
    pid = publisher_pid(gw)
    os.kill(pid, signal.SIGKILL)
    for n in range(1, 21):
        pty.write(reading(n))
    wait_for(lambda: gw.metric("binlink_publisher_restarts_total") == 1, what="restart counted")
    wait_for(lambda: len({e["message_id"] for e in subscriber.events()}) == 20, what="every reading published")
    assert "publisher process exited" in gw.output() and gw.alive()
    assert publisher_pid(gw) != pid


def test_stats_are_nested_readable_json(gw, broker, pty):
    sub = Subscriber(broker.port, topics=("binlink/+/gateway/+/stats",))
    try:
        pty.write(reading(1))
        pty.write(b"\x00noise\x00")
        wait_for(lambda: gw.metric("binlink_frames_accepted_total") == 1, what="accepted")

        def latest():
            stats = sub.json("/stats")
            return stats and stats[-1]["frames_accepted_total"] == 1 and stats[-1]

        stats = wait_for(latest, what="stats after the frame")
        assert stats["frames_read_total"] == {"radio0": 2}
        assert stats["frames_rejected_total"] == {"crc": 1}
        assert stats["serial_connected"] == {"radio0": 1}
        assert "serial_reopens_total" not in stats  # opened once: not a reopen
        assert not any("{" in k for k in stats)
    finally:
        sub.close()


def test_unreachable_broker_is_logged_once_a_minute_and_counted(tmp_path, pty):
    port = free_port()  # nothing listens there
    g = GatewayProcess(tmp_path, port, [("radio0", pty.link, "raw")], devices=DEVICES).start()
    try:
        pty.write(reading(1))
        wait_for(lambda: g.metric("binlink_mqtt_connect_failures_total") >= 2, timeout=30, what="two failed attempts")
        lines = [l for l in g.output().splitlines() if "cannot reach broker" in l]
        assert len(lines) == 1 and "port=%d" % port in lines[0] and "refused" in lines[0].lower()
        assert g.metric("binlink_frames_accepted_total") == 1 and g.metric("binlink_outbox_depth") >= 1
    finally:
        g.kill()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_reader_thread_stops_the_service_with_a_non_zero_code(tmp_path, broker, pty, monkeypatch):
    """A worker that died is not papered over by the watchdog: the service exits for systemd to restart it."""
    from binlink.gateway import config, logs, service
    from binlink.gateway.serial_input import SerialSource

    g = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=DEVICES)  # config only
    cfg = config.load(g.config)
    monkeypatch.setattr(SerialSource, "_read", lambda self, port: 1 / 0)  # a bug in the reader
    logs.setup("info")
    gateway = service.Gateway(cfg)
    result = []
    t = threading.Thread(target=lambda: result.append(gateway.run()))
    t.start()
    t.join(30)
    assert not t.is_alive() and result == [service.EXIT_WORKER_DIED]


def _check(cfg_path):
    return subprocess.run([BINLINK, "gateway", "check-config", str(cfg_path)], capture_output=True, text=True, timeout=30)


def _start(cfg_path):
    return subprocess.run([BINLINK, "gateway", "--config", str(cfg_path)], capture_output=True, text=True, timeout=30)


def test_check_config_opens_every_file_the_gateway_will(tmp_path, broker):
    g = GatewayProcess(tmp_path, broker.port, [("radio0", "/dev/null-radio", "raw")], devices=DEVICES)
    base = open(g.config).read()
    ca, pw = tmp_path / "ca.crt", tmp_path / "mqtt-password"
    cases = [
        ('tls = true\nca_file = "%s"\n' % ca, "mqtt.ca_file: cannot read %s" % ca),
        ('username = "gw"\npassword_file = "%s"\n' % pw, "mqtt.password_file: cannot read %s" % pw),
    ]
    for extra, problem in cases:
        with open(g.config, "w") as f:
            f.write(base.replace("[mqtt]\n", "[mqtt]\n" + extra))
        for r in (_check(g.config), _start(g.config)):  # the gateway refuses in the same words, one line each
            assert r.returncode == 2 and problem in r.stderr, r.stderr
            # check-config also warns (the radio is absent here) and sums up; the problem is one line
            errors = [line for line in r.stderr.strip().splitlines()
                      if not line.startswith("warning:") and " problems (checked as " not in line]
            assert "Traceback" not in r.stderr and len(errors) == 1, r.stderr
    pw.write_text("secret-test\n")
    pw.chmod(0o644)
    r = _check(g.config)
    assert r.returncode == 2 and "mqtt.password_file: %s is readable by other users" % pw in r.stderr
    pw.chmod(0o640)
    ca.write_text("not a certificate\n")
    with open(g.config, "w") as f:
        f.write(base.replace("[mqtt]\n", '[mqtt]\ntls = true\nca_file = "%s"\n' % ca))
    r = _check(g.config)
    assert r.returncode == 2 and "mqtt.ca_file: not usable for TLS" in r.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with open(g.config, "w") as f:
        f.write(base.replace('state_dir = "%s"' % os.path.join(str(tmp_path), "state"), 'state_dir = "%s/state"' % blocker))
    for r in (_check(g.config), _start(g.config)):
        assert r.returncode == 2 and "gateway.state_dir: %s is not a directory" % blocker in r.stderr, r.stderr
    with open(g.config, "w") as f:
        f.write(base)
    os.unlink(g.registry)
    r = _start(g.config)
    assert r.returncode == 2 and "gateway.registry" in r.stderr and g.registry in r.stderr and "Traceback" not in r.stderr


def test_gateway_commands_run_without_the_simulator_extra(tmp_path):
    """A gateway install has no rich/amqtt: decode and check-config work, sim/demo say what to install."""
    block = "import sys; sys.modules.update(rich=None, amqtt=None); from binlink.gateway.cli import main; sys.exit(main(sys.argv[1:]))"
    frame = codec.encode_reading(KEY, 0xA1, 1, 700, 20, 3700).hex()
    r = subprocess.run([sys.executable, "-c", block, "decode", "--key", KEY.hex(), frame], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["fcnt"] == 1
    r = subprocess.run([sys.executable, "-c", block, "demo", "--seconds", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "binlink[sim]" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.xdist_group("build")  # setuptools builds in build/ too
def test_wheel_holds_no_firmware_modules_and_no_simulator_dependencies(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = glob.glob(str(tmp_path / "binlink-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "binlink/wire/codec.py" in names and "binlink/gateway/service.py" in names and "binlink/sim/fleet.py" in names
    assert not [n for n in names if n.startswith("binlink/firmware/")], "firmware modules installed"
    base = [l.split(":", 1)[1].strip() for l in meta.splitlines() if l.startswith("Requires-Dist:") and "extra ==" not in l]
    assert base and not [d for d in base if d.lower().startswith(("rich", "amqtt"))], base
    assert any(l.startswith("Requires-Dist: rich") and 'extra == "sim"' in l for l in meta.splitlines())


def test_acknowledgements_leave_ingest_commits_fsynced(tmp_path):
    """The service writes the publisher's acks without an fsync of their own; its next commit of
    readings is synchronous=FULL again (on disk before a frame counts as accepted)."""
    from binlink.gateway.outbox import Batch, Message, Outbox

    box = Outbox(str(tmp_path / "gw.sqlite"))
    try:
        batch = Batch()
        batch.messages.append(Message("0000a1:0:1", "t", b"{}", 0, 0.0))
        box.commit(batch)
        (row_id, *_), = box.pending(0, 10)
        assert box.ack([row_id]) == 1
        assert box.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert box.pending(0, 10) == []
    finally:
        box.close()


def test_stuck_publisher_stops_the_watchdog(tmp_path, broker, pty, monkeypatch):
    """A publisher process that stops reporting (here: SIGSTOP) counts as dead: no more watchdog
    pings, the service exits for systemd to restart it."""
    from binlink.gateway import config, logs, mqtt_publisher, service

    monkeypatch.setattr(mqtt_publisher, "SILENT_LIMIT_S", 3.0)  # 60 s in service
    g = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=DEVICES)  # config only
    logs.setup("info")
    gateway = service.Gateway(config.load(g.config))
    result = []
    t = threading.Thread(target=lambda: result.append(gateway.run()))
    t.start()
    try:
        wait_for(lambda: gateway.metrics.value("binlink_mqtt_connected") == 1, what="publisher connected")
        os.kill(gateway.publisher.proc.pid, signal.SIGSTOP)
        t.join(30)
        assert not t.is_alive() and result == [service.EXIT_WORKER_DIED]
    finally:
        if gateway.publisher.proc.poll() is None:
            gateway.publisher.proc.kill()
        t.join(30)


def test_a_publisher_killed_again_and_again_is_restarted_at_once_each_time(gw, pty, subscriber):
    """The restart back-off grows only for a process that never reaches the broker: one killed
    after a good start is restarted within a second every time, and nothing is lost."""
    for kills in range(1, 5):
        wait_for(lambda: gw.metric("binlink_mqtt_connected") == 1, what="publisher connected")
        os.kill(publisher_pid(gw), signal.SIGKILL)
        pty.write(reading(kills))
        wait_for(lambda: gw.metric("binlink_publisher_restarts_total") == kills, what="restart %d" % kills)
    wait_for(lambda: len({e["message_id"] for e in subscriber.events()}) == 4, what="every reading published")
    delays = [float(l.split("retry_s=")[1].split()[0]) for l in gw.output().splitlines() if "publisher process exited" in l]
    assert len(delays) == 4 and max(delays) <= 1.0, delays
