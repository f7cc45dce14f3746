"""`binlink watch BIN`: the technician's on-site check, against a real gateway process, Mosquitto and a pty."""
import os
import subprocess
import tempfile

import pytest

from binlink.gateway import registry
from binlink.wire import codec, framing
from tests.harness import BINLINK, KEY, GatewayProcess, ctrl_c_default, wait_for

DEV = 0x00002A


@pytest.fixture
def broker():
    """Mosquitto logging every SUBSCRIBE to a file: a test sends frames once `binlink watch` has
    subscribed (subscribed_at), not after a guessed sleep."""
    from binlink.sim.broker import Mosquitto

    logs = tempfile.mkdtemp(prefix="binlink-watch-test-")
    os.chmod(logs, 0o777)  # Mosquitto drops to its own user
    b = Mosquitto(extra_conf="log_type subscribe\nlog_dest file %s/subscribe.log\n" % logs).start()
    b.subscribe_log = os.path.join(logs, "subscribe.log")
    yield b
    b.stop()


def subscribed(broker, w):
    """Waits until the broker has every subscription of the watch process w (its client id names its pid)."""
    base = "binlink/testcity"
    want = ["%s/bin/library-corner-1/event" % base, "%s/gateway/+/rejected" % base, "%s/gateway/+/status" % base]

    def done():
        assert w.poll() is None, w.communicate()[0]
        try:
            with open(broker.subscribe_log) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return False
        mine = {line.split(" ", 3)[3] for line in lines if line.split(" ")[1:2] == ["binlink-watch-%d" % w.pid]}
        return set(want) <= mine

    wait_for(done, timeout=20, what="binlink watch subscribed")


def watch(tmp_path, broker, *extra):
    reg = tmp_path / "tech-devices.toml"  # the technician's registry after make flash
    if not reg.exists():
        registry.add(str(reg), DEV, "library-corner-1", KEY, 1200, 250)
    return subprocess.Popen([BINLINK, "watch", "library-corner-1", "--registry", str(reg), "--broker",
                             "127.0.0.1:%d" % broker.port, "--site", "testcity", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=ctrl_c_default)


def send_first_cycle(pty, rssi=0xA9):
    """A freshly flashed bin's first wake: hello then a reading, with the E22's RSSI byte (-87 dBm)."""
    for frame in (codec.encode_hello(KEY, DEV, 0, (1, 0, 0), 1, b"\x01\x02\x03\x04"),
                  codec.encode_reading(KEY, DEV, 1, 700, 21, 3700, 0, 5, 5)):
        pty.write(framing.frame(frame) + bytes([rssi]))  # one radio, one bin topic: published in this order


@pytest.fixture
def gateway(tmp_path, broker, pty):
    def start(known):
        devices = [(DEV, "library-corner-1", KEY, 1200, 250)] if known else [(0x0000A1, "other-bin", KEY, 1200, 250)]
        return GatewayProcess(tmp_path / "gw", broker.port, [("radio0", pty.link, "raw+rssi")], devices=devices).start()

    (tmp_path / "gw").mkdir()
    procs = []
    yield lambda known: procs.append(start(known)) or procs[-1]
    for p in procs:
        p.terminate()


def test_a_new_bin_seen_end_to_end_shows_rssi_fill_and_flags(tmp_path, broker, pty, gateway):
    gw = gateway(known=True)
    w = watch(tmp_path, broker, "--timeout", "60")
    subscribed(broker, w)
    send_first_cycle(pty)
    out, _ = w.communicate(timeout=90)
    assert w.returncode == 0, out
    assert "hello via gateway gw-test (radio0): RSSI -87 dBm" in out and "firmware 1.0.0" in out
    assert "reading via gateway gw-test" in out and "distance 700 mm" in out and "ok: bin library-corner-1" in out
    assert "bin=library-corner-1" in gw.output() and "rssi=-87" in gw.output()  # the gateway's log names the bin


def test_a_bin_the_gateway_does_not_know_is_explained(tmp_path, broker, pty, gateway):
    gateway(known=False)
    w = watch(tmp_path, broker, "--timeout", "8")
    subscribed(broker, w)
    send_first_cycle(pty)
    out, _ = w.communicate(timeout=60)
    assert w.returncode == 3, out
    assert "REFUSED by gateway gw-test" in out and "unknown_device" in out and "systemctl reload binlink-gateway" in out


def test_nothing_heard_says_so_and_names_the_online_gateways(tmp_path, broker, pty, gateway):
    gateway(known=True)
    w = watch(tmp_path, broker, "--timeout", "4")
    out, _ = w.communicate(timeout=60)
    assert w.returncode == 1, out
    assert "nothing heard from bin library-corner-1" in out and "gateways online: gw-test" in out


def test_no_broker_and_unknown_bin_are_one_line_errors(tmp_path, broker):
    w = watch(tmp_path, broker, "--broker", "127.0.0.1:1", "--timeout", "2")
    out, _ = w.communicate(timeout=30)
    assert w.returncode != 0 and "cannot reach the broker at 127.0.0.1:1" in out and "Traceback" not in out
    r = subprocess.run([BINLINK, "watch", "no-such-bin", "--registry", str(tmp_path / "tech-devices.toml"), "--site", "x"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "bin no-such-bin is not in" in r.stderr


def test_rejection_notices_are_rate_limited_per_device(tmp_path, broker, pty, gateway, subscriber):
    gateway(known=False)
    for n in range(30):
        pty.write(framing.frame(codec.encode_reading(KEY, DEV, n, 700, 21, 3700)) + b"\xa9")
    # a marker: another unknown bin's frame after the 30. The gateway reads one radio in order and
    # publishes its notices in order on one connection: once the marker's notice is here, every
    # notice the 30 frames caused is here too
    pty.write(framing.frame(codec.encode_reading(KEY, DEV + 1, 0, 700, 21, 3700)) + b"\xa9")
    wait_for(lambda: [n for n in subscriber.json("/rejected") if n["device"] == "00002b"], what="the marker's notice")
    notices = subscriber.json("/rejected")
    assert [n["device"] for n in notices] == ["00002a", "00002b"]
    assert notices[0]["reason"] == "unknown_device"


def _subscribed(broker, client_prefix, topic):
    """True once the broker's log shows a client whose id starts with client_prefix subscribing to topic."""
    try:
        with open(broker.subscribe_log) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return False
    return any(len(p) > 3 and p[1].startswith(client_prefix) and p[3] == topic for p in (line.split(" ", 3) for line in lines))


@pytest.mark.parametrize("command", ["watch", "plan"])
def test_ctrl_c_ends_watch_and_plan_in_one_line_with_130(tmp_path, broker, command):
    """Ctrl-C while waiting on the broker: `interrupted`, exit status 130, no traceback."""
    import signal

    if command == "watch":
        w = watch(tmp_path, broker, "--timeout", "120")
        subscribed(broker, w)
    else:
        w = subprocess.Popen([BINLINK, "plan", "--port", str(broker.port), "--site", "testcity", "--timeout", "120"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=ctrl_c_default)
        wait_for(lambda: w.poll() is not None or _subscribed(broker, "binlink-plan-view-", "binlink/testcity/plan"),
                 timeout=20, what="binlink plan subscribed")
    w.send_signal(signal.SIGINT)
    out, _ = w.communicate(timeout=30)
    assert w.returncode == 130, out
    assert "Traceback" not in out and out.strip().splitlines()[-1] == "interrupted", out


def test_plan_without_a_broker_is_one_line():
    from binlink.sim.broker import free_port

    r = subprocess.run([BINLINK, "plan", "--port", str(free_port()), "--site", "x", "--timeout", "5"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot reach the broker" in r.stderr, r.stderr
