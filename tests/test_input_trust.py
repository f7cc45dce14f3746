"""What anyone who reaches the gateway's inputs can do to it: the Wi-Fi uplink topic (any payload,
any client id) and the metrics endpoint (any number of connections)."""
import logging
import queue
import socket
import time
import types
import urllib.request

import paho.mqtt.client as mqtt
import pytest

from binlink.gateway import config
from binlink.gateway.metrics import MAX_CONNECTIONS, Metrics
from binlink.gateway.wifi_input import MAX_PAYLOAD, WifiInput
from tests.harness import wait_for


@pytest.fixture
def said():
    """Log records of the gateway's loggers (the "binlink" logger may not propagate to pytest's)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    root = logging.getLogger("binlink")
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield records
    root.removeHandler(handler)
    root.setLevel(level)


def _cfg(tmp_path, port=1883):
    return config.parse({"gateway": {"id": "g", "site": "s", "registry": "r", "state_dir": str(tmp_path)},
                         "source": [], "mqtt": {"port": port}})


def _wifi(tmp_path, port=1883):
    return WifiInput(_cfg(tmp_path, port), queue.Queue(), Metrics())


def test_a_wifi_payload_longer_than_any_frame_is_refused_as_oversize(tmp_path):
    from binlink.gateway.outbox import Outbox
    from binlink.gateway.pipeline import Pipeline

    wifi = _wifi(tmp_path)
    wifi._on_message(None, None, types.SimpleNamespace(payload=bytes(64 << 20)))
    wifi._on_message(None, None, types.SimpleNamespace(payload=bytes(MAX_PAYLOAD)))
    (_, [big]), (_, [small]) = wifi.queue.get_nowait(), wifi.queue.get_nowait()
    assert big.frame is None and big.reason == "oversize" and str(64 << 20) in big.detail
    assert small.frame == bytes(MAX_PAYLOAD)
    metrics = Metrics()
    p = Pipeline(wifi.cfg, {}, Outbox(str(tmp_path / "o.sqlite")), metrics)
    p.process([("mqtt", big)])
    assert metrics.value("binlink_frames_rejected_total", reason="oversize") == 1


def test_the_uplink_client_id_is_this_gateways_own_and_kept_across_restarts(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    a = _wifi(first).client_id()
    assert a.startswith("binlink-g-uplink-") and len(a) == len("binlink-g-uplink-") + 8
    assert _wifi(first).client_id() == a  # a restart resumes the broker's session
    assert _wifi(second).client_id() != a  # another gateway with the same configuration does not take it


def test_the_broker_drops_huge_payloads_and_a_takeover_is_said(tmp_path, broker, said):
    wifi = _wifi(tmp_path, broker.port)
    wifi.start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:
        wait_for(lambda: any(r.getMessage() == "taking Wi-Fi uplinks" for r in said), what="subscribed")
        for payload in (bytes(1 << 20), bytes(1000), b"frame"):
            pub.publish("binlink/uplink", payload, qos=1).wait_for_publish(5)
        _, [first] = wifi.queue.get(timeout=5)  # the megabyte never came: the broker dropped it (MAX_PACKET)
        _, [second] = wifi.queue.get(timeout=5)
        assert first.reason == "oversize" and "1000 bytes" in first.detail and second.frame == b"frame"

        thief = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=wifi.client_id())
        thief.connect("127.0.0.1", broker.port)
        thief.loop_start()
        try:
            wait_for(lambda: wifi.metrics.value("binlink_wifi_uplink_takeovers_total") >= 1, what="takeover counted")
        finally:
            thief.loop_stop()
            thief.disconnect()
        taken = [r for r in said if r.levelno == logging.ERROR and "taken over" in r.getMessage()]
        assert taken and taken[0].fields["client_id"] == wifi.client_id()
    finally:
        pub.loop_stop()
        wifi.stop()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_idle_connections_do_not_keep_a_scrape_out(said):
    metrics = Metrics()
    port = _free_port()
    server, _ = metrics.serve("127.0.0.1", port)
    idle = []
    try:
        for _ in range(1000):
            idle.append(socket.create_connection(("127.0.0.1", port)))
        wait_for(lambda: server.open_connections() <= MAX_CONNECTIONS, what="connections capped")
        t0 = time.monotonic()
        body = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5).read()
        assert b"binlink_frames_accepted_total" in body and time.monotonic() - t0 < 2
        assert server.open_connections() <= MAX_CONNECTIONS
        assert not [r for r in said if r.levelno >= logging.WARNING]  # loopback: nothing to warn about
    finally:
        for s in idle:
            s.close()
        server.shutdown()
        server.server_close()


def test_metrics_listening_beyond_this_host_are_said(said):
    server, _ = Metrics().serve("0.0.0.0", _free_port())
    server.shutdown()
    server.server_close()
    (warning,) = [r for r in said if r.levelno == logging.WARNING]
    assert "names bins" in warning.getMessage() and warning.fields["listen"].startswith("0.0.0.0:")
