"""The publisher's MQTT client against a real Mosquitto, and its packet parser under any split."""
import select
import struct
import time

import pytest
from hypothesis import given, strategies as st

from binlink.gateway import mqtt_wire
from binlink.sim.broker import Mosquitto
from tests.harness import Subscriber, wait_for
from tests.test_mqtt_hostile import ScriptedBroker


@pytest.fixture(scope="module")
def scripted_broker():
    b = ScriptedBroker()
    yield b
    b.close()


def _drain(session, mids, timeout=20):
    """Reads until every mid is acknowledged; returns the messages received meanwhile."""
    session.flush()
    want, received = set(mids), []
    deadline = time.monotonic() + timeout
    while want and time.monotonic() < deadline:
        if not select.select([session], [], [], 0.5)[0]:
            continue
        acked, got = session.read()
        want -= set(acked)
        received += got
    assert not want, "%d messages never acknowledged" % len(want)
    return received


def test_a_window_in_one_write_is_acknowledged_and_arrives_in_order(broker):
    sub = Subscriber(broker.port, topics=("wire/#",))
    s = mqtt_wire.Session("127.0.0.1", broker.port, "wire-test")
    try:
        mids = [s.publish("wire/t", b"%d" % i) for i in range(3000)]
        s.flush()
        _drain(s, mids)
        assert len(set(mids)) == 3000
        wait_for(lambda: len(sub.on("wire/t")) == 3000, what="3000 messages at the subscriber")
        assert [int(p) for _, p in sub.on("wire/t")] == list(range(3000))
    finally:
        s.disconnect()
        sub.close()


def test_subscription_receives_qos1_and_acknowledges_it(broker):
    s = mqtt_wire.Session("127.0.0.1", broker.port, "wire-sub")
    pub = mqtt_wire.Session("127.0.0.1", broker.port, "wire-pub")
    try:
        s.subscribe("homeassistant/status")
        s.flush()
        deadline = time.monotonic() + 10
        while "homeassistant/status" not in s.subscribed:  # the SUBACK: the broker now routes to us
            assert time.monotonic() < deadline, "no SUBACK"
            if select.select([s], [], [], 0.5)[0]:
                s.read()
        _drain(pub, [pub.publish("homeassistant/status", "online", qos=1)])
        deadline, got = time.monotonic() + 10, []
        while not got and time.monotonic() < deadline:
            if select.select([s], [], [], 0.5)[0]:
                got += s.read()[1]
        assert got == [("homeassistant/status", b"online")]
    finally:
        s.disconnect()
        pub.disconnect()


def test_keepalive_pings_keep_an_idle_session(broker):
    s = mqtt_wire.Session("127.0.0.1", broker.port, "wire-idle", keepalive=1)
    try:
        end = time.monotonic() + 4  # the broker drops a client silent for 1.5 keepalives
        while time.monotonic() < end:
            if select.select([s], [], [], max(0.0, min(s.next_due(), end) - time.monotonic()))[0]:
                s.read()  # PINGRESP; a closed connection raises here
            s.tick(time.monotonic())  # raises BrokerSilent if a PINGRESP is missing
        _drain(s, [s.publish("wire/alive", b"1")])
    finally:
        s.disconnect()


def test_refused_credentials_raise_refused():
    b = Mosquitto(extra_conf="allow_anonymous false\n").start()
    try:
        with pytest.raises(mqtt_wire.Refused, match="not authorised|bad username"):
            mqtt_wire.Session("127.0.0.1", b.port, "wire-refused", username="nobody", password="x")
    finally:
        b.stop()


def _publish_packet(topic, payload, mid):
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if mid else b"") + payload
    return bytes([0x32 if mid else 0x30]) + mqtt_wire._varint(len(body)) + body


@given(st.lists(st.one_of(st.integers(1, 65535).map(lambda m: ("ack", m)),
                          st.tuples(st.just("pub"), st.binary(min_size=1, max_size=30), st.binary(max_size=300),
                                    st.integers(0, 65535))), max_size=30),
       st.lists(st.integers(1, 50), max_size=20))
def test_parser_reads_the_same_packets_however_the_stream_is_split(scripted_broker, packets, cuts):
    """A real session; the scripted broker sends the stream in the given pieces, one read each, and
    ends with a PINGRESP (the last PUBACK counts once a later packet proves the session alive)."""
    stream = b"".join(struct.pack("!BBH", 0x40, 2, p[1]) if p[0] == "ack" else _publish_packet(*p[1:]) for p in packets)
    chunks, pos = [], 0
    for c in cuts:
        chunks.append(stream[pos:pos + c])
        pos += c
    chunks += [stream[pos:], b"\xd0\x00"]
    s = mqtt_wire.Session("127.0.0.1", scripted_broker.port, "split", keepalive=0)
    peer = scripted_broker.accept()
    acked, received = [], []
    try:
        for chunk in filter(None, chunks):
            peer.send(chunk)
            assert select.select([s], [], [], 10)[0]
            a, r = s.read()
            acked += a
            received += r
    finally:
        s.close()
        peer.close()
    assert acked == [p[1] for p in packets if p[0] == "ack"]
    assert received == [(p[1].decode("utf-8", "replace"), p[2]) for p in packets if p[0] == "pub"]
    assert not s._in and s.unproven_ack is None  # nothing left over
