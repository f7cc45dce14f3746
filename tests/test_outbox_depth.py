"""binlink_outbox_depth never goes below zero: the clearing messages `binlink registry retire`
queues (outbox_spool.py) are counted by the service as it takes them in, before the broker's
acknowledgements of them (a real gateway, a real Mosquitto, the real command)."""
import os
import subprocess

from binlink.wire import codec, framing
from tests.harness import BINLINK, KEY, KEY2, wait_for

DEVICES = [(0xA1, "bin-a", KEY, 1200, 200), (0xB2, "bin-b", KEY2, 1200, 200)]


def test_retire_while_the_gateway_runs_leaves_the_depth_at_zero_not_below(gw, pty, subscriber):
    pty.write(framing.frame(codec.encode_reading(KEY, 0xA1, 1, 700, 20, 3700)))
    pty.write(framing.frame(codec.encode_reading(KEY2, 0xB2, 1, 700, 20, 3700)))
    wait_for(lambda: gw.metric("binlink_frames_accepted_total") == 2, what="both accepted")
    wait_for(lambda: subscriber.on("bin/bin-b/state") and gw.metric("binlink_outbox_depth") == 0, what="published")
    published = gw.metric("binlink_messages_published_total")
    out = subprocess.run([BINLINK, "registry", "--config", gw.config, "retire", "bin-b"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    queued = int(out.stdout.split("queued ")[1].split()[0])  # "queued N empty retained messages ..."
    assert queued >= 2
    depths = []

    def cleared():
        m = gw.metrics()
        depths.append(m[("binlink_outbox_depth", ())])
        return m[("binlink_messages_published_total", ())] >= published + queued

    wait_for(cleared, timeout=30, what="the retired bin's clearing messages acknowledged")
    # the retained state is gone (its clear reaches the subscriber after the gateway's PUBACK, not before)
    wait_for(lambda: subscriber.on("bin/bin-b/state")[-1][1] == b"", what="the retired bin's state cleared")
    assert min(depths) >= 0 and depths[-1] == 0, depths  # was -N: N rows acknowledged that were never counted
    pty.write(framing.frame(codec.encode_reading(KEY, 0xA1, 2, 700, 20, 3700)))  # and the count goes on right
    wait_for(lambda: gw.metric("binlink_frames_accepted_total") == 3, what="accepted")
    wait_for(lambda: gw.metric("binlink_messages_published_total") >= published + queued + 2, what="published")
    assert gw.metric("binlink_outbox_depth") == 0


def test_a_spool_file_not_as_retire_writes_it_is_set_aside_said_and_the_gateway_goes_on(gw, pty, subscriber):
    spool = os.path.join(gw.tmp, "state", "spool")
    os.makedirs(spool, exist_ok=True)
    with open(os.path.join(spool, "1-1.json"), "w") as f:  # a wildcard topic: nothing a retire queues
        f.write('{"at": 1, "messages": [{"key": "k", "topic": "binlink/#"}]}')
    wait_for(lambda: os.listdir(spool) == ["1-1.rejected"], what="the spool file set aside")
    assert "spool file refused and set aside" in gw.output() and "not a topic to publish to" in gw.output()
    pty.write(framing.frame(codec.encode_reading(KEY, 0xA1, 1, 700, 20, 3700)))
    wait_for(lambda: len(subscriber.events()) == 1, what="a reading published after it")
    assert gw.alive() and gw.metric("binlink_outbox_depth") == 0
