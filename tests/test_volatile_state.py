"""State that a power cut or the years take away: a state directory in RAM (tmpfs, ramfs) refused
on this machine's real mount table, and a counter's end of life said well ahead (a counter never
wraps: at 2^32-1 the key is used up, docs/protocol.md "Edge cases")."""
import logging
import os
import subprocess
import tempfile
import time

import pytest

from binlink.gateway import config_rules, registry, service
from binlink.gateway.metrics import Metrics
from tests.harness import BINLINK, KEY, wait_for




def test_check_config_refuses_a_real_tmpfs_state_dir_unless_allowed(tmp_path):
    """/dev/shm is a tmpfs on Linux: the real /proc/self/mountinfo, read by the real command."""
    if config_rules.filesystem_of("/dev/shm") is None or config_rules.filesystem_of("/dev/shm")[1] != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm here")
    registry.add(str(tmp_path / "r.toml"), 0xA1, "bin-a", KEY, 1200, 200)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as ram:
        state = os.path.join(ram, "state")
        for allow, code in (("", 2), ("allow_volatile_state = true\n", 0)):
            cfg = tmp_path / "gw.toml"
            cfg.write_text('[gateway]\nid = "g"\nsite = "s"\nregistry = "r.toml"\nstate_dir = "%s"\n%s[[source]]\n'
                           'port = "/dev/x"\n' % (state, allow))
            r = subprocess.run([BINLINK, "gateway", "check-config", str(cfg)], capture_output=True, text=True, timeout=30)
            assert r.returncode == code, r.stderr
            if code:
                assert "config error: gateway.state_dir: %s is on a tmpfs (mounted at /dev/shm)" % state in r.stderr
                assert "allow_volatile_state = true" in r.stderr and "Traceback" not in r.stderr


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def warnings():
    h = Lines()
    logger = logging.getLogger("binlink.service")
    logger.addHandler(h)
    try:
        yield h.records
    finally:
        logger.removeHandler(h)


def test_counter_headroom_gauge_and_one_warning_per_device_past_2_31(warnings):
    devices = {0xA1: registry.Device(0xA1, "bin-a", KEY, 1200, 200), 0xB2: registry.Device(0xB2, "bin-b", KEY, 1000, 100)}
    m, warned = Metrics(), set()
    assert m.value("binlink_counter_headroom_min") == 2**32 - 1  # no bin heard yet: all of it
    service.counter_headroom({}, devices, m, warned)
    assert m.value("binlink_counter_headroom_min") == 2**32 - 1 and not warnings
    counters = {0xA1: 1000, 0xB2: 2**31 - 1}
    service.counter_headroom(counters, devices, m, warned)
    assert m.value("binlink_counter_headroom_min") == 2**32 - 1 - (2**31 - 1)  # the smallest over all bins
    assert not [r for r in warnings if r.levelno >= logging.WARNING]  # 2^31 - 1 has not passed 2^31
    counters[0xB2] = 2**31
    for _ in range(3):  # every stats interval: said once
        service.counter_headroom(counters, devices, m, warned)
    said = [r for r in warnings if r.levelno == logging.WARNING]
    assert len(said) == 1 and "binlink registry rekey bin-b" in said[0].getMessage()
    assert said[0].fields["device"] == "0000b2" and said[0].fields["left"] == 2**31 - 1
    counters[0xA1] = 2**32 - 1  # used up: no headroom, and the other bin said once too
    service.counter_headroom(counters, devices, m, warned)
    assert m.value("binlink_counter_headroom_min") == 0
    said = [r for r in warnings if r.levelno == logging.WARNING]
    assert len(said) == 2 and "binlink registry rekey bin-a" in said[1].getMessage()
    assert "counter_headroom_min" in m.snapshot()  # in the stats topic too


DEVICES = [(0xA1, "bin-a", KEY, 1200, 200)]  # the gw fixture registers these


def test_a_running_gateway_publishes_the_headroom_and_warns_once(gw, pty):
    """Through the stats loop of a real gateway (status_interval_s = 1)."""
    from binlink.wire import codec, framing

    # a reading carries 16 counter bits: a hello (version 2) names the full counter first
    pty.write(framing.frame(codec.encode_hello(KEY, 0xA1, 2**31 + 5, (1, 0, 0), 1, b"\x00\x00\x00\x01")))
    pty.write(framing.frame(codec.encode_reading(KEY, 0xA1, 2**31 + 6, 700, 20, 3700, 0, 5, 5)))
    wait_for(lambda: gw.metric("binlink_frames_accepted_total") == 2, what="2 accepted")
    wait_for(lambda: gw.metric("binlink_counter_headroom_min") == 2**32 - 1 - (2**31 + 6), what="headroom published")
    time.sleep(2.5)  # two more stats intervals: still said once
    out = gw.output()
    assert out.count("frame counter past 2^31") == 1 and "binlink registry rekey bin-a" in out, out[-3000:]
