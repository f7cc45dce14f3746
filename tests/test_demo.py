"""`make demo` stopped as the README says: Ctrl-C in the terminal, i.e. SIGINT to its whole process group."""
import os
import re
import signal
import subprocess
import threading

from tests.harness import BINLINK, Subscriber, ctrl_c_default, wait_for, wait_port


def test_ctrl_c_stops_the_demo_with_a_summary_that_adds_up():
    p = subprocess.Popen([BINLINK, "demo", "--bins", "20", "--seconds", "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=ctrl_c_default)
    out, err = [], []

    def read(f, into):
        for line in f:
            into.append(line)

    readers = [threading.Thread(target=read, args=(f, into), daemon=True) for f, into in ((p.stdout, out), (p.stderr, err))]
    for r in readers:
        r.start()
    sub = None
    try:
        # the demo names its broker's port; frames flowing = readings published by its gateway, which
        # happens only once the fleet runs, the moment the live view (where Ctrl-C is handled) starts
        line = wait_for(lambda: next((m for m in map(re.compile(r"broker .* on 127\.0\.0\.1:(\d+)").search, out) if m), None)
                        or p.poll() is not None, timeout=60, what="the demo's broker")
        assert p.poll() is None, "".join(out + err)[-2000:]
        wait_port(int(line.group(1)), timeout=30)  # named as it starts: on a loaded host it may not listen yet
        sub = Subscriber(int(line.group(1)), topics=("binlink/demo/#",))
        wait_for(lambda: len(sub.events()) >= 20 or p.poll() is not None, timeout=90, what="readings published")
        assert p.poll() is None, "".join(out + err)[-2000:]
        os.killpg(p.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the whole foreground group
        try:
            p.wait(timeout=90)
        except subprocess.TimeoutExpired:
            raise AssertionError("the demo did not stop within 90 s of Ctrl-C: " + "".join(out + err)[-3000:]) from None
    finally:
        if sub is not None:
            sub.close()
        if p.poll() is None:  # its whole session: a gateway left behind would hold its pty (and a later test's)
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    for r in readers:
        r.join(10)
    out, err = "".join(out), "".join(err)
    assert p.returncode == 0, err[-2000:]
    assert "Traceback" not in out + err
    fields = {k: int(v) for k, v in (kv.split("=") for kv in out.strip().splitlines()[-1].split())}
    assert fields["sent"] > 0 and fields["lost_after_gateway"] == 0
    assert fields["sent"] == (fields["published"] + fields["hellos"] + fields["repeated"] + fields["lost_on_air"]
                              + fields["rejected"])


def retained(port, topics=("#",)):
    """Every retained message under topics right now: a fresh subscription gets them first, then a
    marker published after subscribing arrives after all of them (one connection, in order)."""
    import paho.mqtt.client as mqtt

    got, done = [], threading.Event()
    marker = "binlink-test/marker/%d" % os.getpid()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-retained-%d" % os.getpid())

    def on_message(client, userdata, msg):
        if msg.topic == marker:
            done.set()
        elif msg.retain:
            got.append((msg.topic, msg.payload))

    c.on_message = on_message
    c.on_subscribe = lambda client, *a: client.publish(marker, b"x", qos=1)
    c.on_connect = lambda client, *a: client.subscribe([(t, 1) for t in topics] + [(marker, 1)])
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        assert done.wait(30), "the marker never came back"
    finally:
        c.loop_stop()
        c.disconnect()
    return got


def test_the_demo_on_a_real_broker_removes_what_it_retained(broker):
    """`binlink demo --broker HOST:PORT` on the user's broker: bin states, gateway status and Home
    Assistant discovery of the simulated bins are gone when it ends, and it says so; a retained
    message of someone else's is left alone."""
    import paho.mqtt.publish as publish

    publish.single("homeassistant/sensor/kitchen/config", b'{"name": "kitchen"}', retain=True, hostname="127.0.0.1",
                   port=broker.port)
    r = subprocess.run([BINLINK, "demo", "--bins", "3", "--seconds", "3", "--broker", "127.0.0.1:%d" % broker.port],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    m = re.search(r"removed (\d+) of (\d+) retained messages the demo left", r.stdout)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) >= 3, r.stdout[-2000:]
    left = retained(broker.port)
    assert left == [("homeassistant/sensor/kitchen/config", b'{"name": "kitchen"}')], left
