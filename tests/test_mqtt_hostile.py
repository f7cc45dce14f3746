"""The publisher's MQTT client (mqtt_wire) and its process loop (publisher_worker) against brokers
that misbehave: a scripted loopback broker speaking raw MQTT bytes the test chooses, and a real
Mosquitto stopped with SIGSTOP or denying a topic by ACL."""
import logging
import os
import pickle
import queue
import select
import signal
import socket
import struct
import threading
import time
from multiprocessing.connection import Pipe

import pytest

from binlink.gateway import config, homeassistant, logs, mqtt_publisher, mqtt_wire, publisher_worker
from binlink.gateway.metrics import Metrics
from binlink.gateway.publish_policy import Backoff
from binlink.gateway.registry import Device
from tests.harness import KEY, Subscriber, wait_for, write_config

CONNACK_OK = b"\x20\x02\x00\x00"
PINGRESP = b"\xd0\x00"


def publish_packet(topic, payload, mid=None, qos=1):
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"") + payload
    return bytes([0x30 | qos << 1]) + mqtt_wire._varint(len(body)) + body


def puback(mid):
    return struct.pack("!BBH", 0x40, 2, mid)


def _split_packet(buf):
    """(first byte, body) of the packet at the start of buf, removed from it; None if incomplete."""
    length, shift, j = 0, 0, 1
    while j < len(buf):
        length |= (buf[j] & 0x7F) << shift
        shift += 7
        j += 1
        if not buf[j - 1] & 0x80:
            if j + length > len(buf):
                return None
            kind, body = buf[0], bytes(buf[j:j + length])
            del buf[:j + length]
            return kind, body
    return None


class Peer:
    """One client connection, as the scripted broker sees it."""

    def __init__(self, sock, connect):
        self.sock, self.connect, self.buf = sock, connect, bytearray()
        self.published = []  # (topic, payload, mid) of every PUBLISH served
        self.pings = 0
        self.reused = []  # packet ids the client sent again while the broker had not acknowledged them
        self._outstanding = set()

    def packet(self, timeout=10.0):
        """The next packet from the client: (first byte, body); None when it closed the connection."""
        deadline = time.monotonic() + timeout
        while True:
            got = _split_packet(self.buf)
            if got:
                return got
            if not select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError("no packet from the client in %.1f s" % timeout)
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                return None
            self.buf += data

    def send(self, data):
        self.sock.sendall(data)

    def close(self):
        self.sock.close()

    def serve(self, on_publish=None):
        """Answers like a broker, in a thread: PUBACK, SUBACK (granted), PINGRESP. on_publish(peer,
        topic, payload, mid) may answer instead (it returns True when it did)."""
        def loop():
            try:
                while True:
                    got = self.packet(timeout=600)
                    if got is None or got[0] == 0xE0:
                        break
                    kind, body = got
                    if kind >> 4 == 3:
                        (tlen,) = struct.unpack_from("!H", body)
                        topic = body[2:2 + tlen].decode()
                        mid = struct.unpack_from("!H", body, 2 + tlen)[0] if kind & 0x06 else None
                        if mid is not None:
                            if mid in self._outstanding:
                                self.reused.append(mid)
                            self._outstanding.add(mid)
                        payload = body[2 + tlen + (2 if mid is not None else 0):]
                        self.published.append((topic, payload, mid))
                        if on_publish is None or not on_publish(self, topic, payload, mid):
                            if mid is not None:
                                self.ack(mid)
                    elif kind == 0x82:
                        self.send(b"\x90\x03" + body[:2] + b"\x01")
                    elif kind == 0xC0:
                        self.pings += 1
                        self.send(PINGRESP)
            except (OSError, ValueError):  # closed by the test meanwhile
                pass

        threading.Thread(target=loop, daemon=True).start()
        return self

    def ack(self, mid):
        self._outstanding.discard(mid)
        self.send(puback(mid))


class ScriptedBroker:
    """A TCP listener on loopback that answers each CONNECT with connack(n) (n: the connection's
    number from 0) and hands the connection to the test as a Peer."""

    def __init__(self, connack=lambda n: CONNACK_OK):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connack = connack
        self.peers = queue.Queue()
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = Peer(sock, None)
            try:
                peer.connect = peer.packet()
                answer = self.connack(self.accepted)
                if answer:
                    peer.send(answer)
            except (OSError, TimeoutError):
                continue
            self.accepted += 1
            self.peers.put(peer)

    def accept(self, timeout=15.0):
        return self.peers.get(timeout=timeout)

    def serve_all(self, on_publish):
        """Serves every connection to come (one after the other) with on_publish, in a thread."""
        def serve_each():
            while True:
                try:
                    self.accept(timeout=60).serve(on_publish)
                except queue.Empty:
                    return
        threading.Thread(target=serve_each, daemon=True).start()

    def close(self):
        self.listener.close()


@pytest.fixture
def scripted():
    b = ScriptedBroker()
    yield b
    b.close()


def read_until(session, done, timeout=10.0):
    """Drives a session (select, read, tick) until done(acked so far) or it raises."""
    acked = []
    deadline = time.monotonic() + timeout
    while not done(acked):
        assert time.monotonic() < deadline, "condition not reached in %.1f s" % timeout
        due = session.next_due() or time.monotonic() + 0.2
        wait = max(0.0, min(due, deadline) - time.monotonic())
        if select.select([session], [], [], wait)[0]:
            acked += session.read()[0]
        session.tick(time.monotonic())
    return acked


# the client ---------------------------------------------------------------------------------------

def test_a_broker_silent_after_connack_is_noticed_within_one_and_a_half_keepalives(scripted):
    s = mqtt_wire.Session("127.0.0.1", scripted.port, "silent", keepalive=2)
    peer = scripted.accept()
    t0 = time.monotonic()
    with pytest.raises(mqtt_wire.BrokerSilent):
        read_until(s, lambda acked: False, timeout=10)
    took = time.monotonic() - t0
    assert 1.5 <= took <= 3.0, took  # pinged after 1 s of silence, given up 1 s later
    assert peer.packet() == (0xC0, b"")  # it did ask before giving up
    s.close()


def test_a_broker_that_answers_pings_keeps_the_session(scripted):
    s = mqtt_wire.Session("127.0.0.1", scripted.port, "pinged", keepalive=1)
    peer = scripted.accept().serve()
    end = time.monotonic() + 3.5
    read_until(s, lambda acked: time.monotonic() >= end, timeout=10)
    assert peer.pings >= 3
    s.close()


MALFORMED = {
    "1-byte PUBLISH": b"\x30\x01\x00",
    "PUBLISH shorter than its topic": b"\x30\x04\x00\x09ab",
    "QoS 1 PUBLISH without its packet id": b"\x32\x03\x00\x01a",
    "inbound QoS 2": publish_packet(b"homeassistant/status", b"online", 7, qos=2),
    "PUBLISH with QoS 3": b"\x36\x05\x00\x01a\x00\x01",
    "remaining length of 5 bytes": b"\x30\x80\x80\x80\x80\x01",
    "PUBLISH declaring 268 MB": b"\x30\xff\xff\xff\x7f",
    "PUBACK of the wrong length": b"\x40\x03\x00\x01\x00",
    "a second CONNACK": CONNACK_OK,
    "PUBREC (QoS 2 is never sent)": b"\x50\x02\x00\x01",
    "reserved packet type": b"\xf0\x00",
    "SUBACK for an id never used": b"\x90\x03\x00\x07\x00",
    "PINGRESP with a body": b"\xd0\x01\x00",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_packet_ends_the_session_with_a_protocol_error(scripted, name):
    s = mqtt_wire.Session("127.0.0.1", scripted.port, "malformed", keepalive=0)
    peer = scripted.accept()
    peer.send(MALFORMED[name])  # nothing after it: an oversized length is refused from its header alone
    with pytest.raises(mqtt_wire.ProtocolError):
        read_until(s, lambda acked: False, timeout=5)
    s.close()


@pytest.mark.parametrize("connack, error", [
    (b"\x20\x03\x00\x00\x00", mqtt_wire.ProtocolError),  # wrong length
    (b"\x20\x01\x00", mqtt_wire.ProtocolError),
    (b"\x20\x02\x01\x00", mqtt_wire.ProtocolError),  # a session present, for a clean session
    (b"\x30\x00", mqtt_wire.ProtocolError),  # not a CONNACK
    (b"\x20\x02\x00\x05", mqtt_wire.Refused),
])
def test_connack_is_checked(connack, error):
    b = ScriptedBroker(connack=lambda n: connack)
    try:
        with pytest.raises(error):
            mqtt_wire.Session("127.0.0.1", b.port, "connack", timeout=5)
    finally:
        b.close()


def test_keepalive_is_bounded_to_sixteen_bits(scripted):
    for bad in (-1, 65536, 70000):
        with pytest.raises(ValueError, match="keepalive"):
            mqtt_wire.Session("127.0.0.1", scripted.port, "ka", keepalive=bad)
    s = mqtt_wire.Session("127.0.0.1", scripted.port, "ka", keepalive=65535)
    assert scripted.accept().connect[1][8:10] == b"\xff\xff"  # the CONNECT's keepalive field
    s.close()
    s = mqtt_wire.Session("127.0.0.1", scripted.port, "ka", keepalive=0)
    assert s.next_due() is None  # no keepalive: no pings, no silence limit
    s.close()


def test_no_packet_id_is_reused_while_in_flight(scripted):
    s = mqtt_wire.Session("127.0.0.1", scripted.port, "ids", keepalive=0)
    peer = scripted.accept()
    mids = [s.publish("t", b"x") for _ in range(65535)]
    assert sorted(mids) == list(range(1, 65536))
    with pytest.raises(OverflowError):
        s.publish("t", b"x")
    s._out = []  # nothing of this needs to reach the broker
    waiting = {6, 7, 8, 40000}
    peer.send(b"".join(puback(m) for m in mids if m not in waiting) + PINGRESP)  # the PINGRESP proves the last PUBACK
    read_until(s, lambda acked: len(acked) == 65535 - len(waiting))
    again = [s.publish("t", b"x") for _ in range(65535 - len(waiting))]
    assert not waiting & set(again) and len(set(again)) == len(again)
    s.close()


def test_a_puback_counts_only_once_a_later_packet_proves_the_session_alive(scripted):
    s = mqtt_wire.Session("127.0.0.1", scripted.port, "proof", keepalive=0)
    peer = scripted.accept()
    first, second = s.publish("t", b"1"), s.publish("t", b"2")
    s.flush()
    peer.send(puback(first) + puback(second))
    acked = read_until(s, lambda acked: first in acked)
    assert second not in acked and s.unproven_ack == second
    # nothing else in flight: the client asks for a PINGRESP to prove the last one
    assert peer.packet()[0] == 0x32 and peer.packet()[0] == 0x32 and peer.packet() == (0xC0, b"")
    peer.send(PINGRESP)
    assert read_until(s, lambda acked: acked) == [second]
    # Mosquitto's answer to a denied publish: PUBACK, then the connection closed
    denied = s.publish("denied", b"3")
    s.flush()
    peer.send(puback(denied))
    peer.close()
    with pytest.raises(ConnectionError):
        read_until(s, lambda acked: False)
    assert s.unproven_ack == denied
    s.close()


def test_a_refused_subscription_is_reported(scripted):
    s = mqtt_wire.Session("127.0.0.1", scripted.port, "suback", keepalive=0)
    peer = scripted.accept()
    mid = s.subscribe("homeassistant/status")
    s.flush()
    assert peer.packet()[0] == 0x82
    peer.send(b"\x90\x03" + struct.pack("!H", mid) + b"\x80")
    read_until(s, lambda acked: s.refused)
    assert s.refused == ["homeassistant/status"] and not s.subscribed
    s.close()


def test_backoff_doubles_with_jitter_and_resets_after_a_good_run():
    b = Backoff(1.0, 30.0, good_after_s=60)
    delays = [b.next_delay() for _ in range(8)]
    for n, d in enumerate(delays):
        ceiling = min(30.0, 2.0 ** n)
        assert ceiling / 2 <= d <= ceiling
    assert len({round(d, 6) for d in delays[5:]}) > 1  # jittered, not a constant 30
    b.ran(5)
    assert b.next_delay() > 15  # a short run keeps the back-off
    b.ran(61)
    assert b.next_delay() <= 1.0


# the publisher process's loop -----------------------------------------------------------------------

class WorkerRun:
    """publisher_worker.Worker in a thread of the test, against a broker on port, the service side
    played by the test: reports collected, requests for rows answered from `rows`, acknowledged
    rows taken off them (the service's part, outbox_feed.answer, is tested with a real outbox)."""

    def __init__(self, tmp_path, port, keepalive=30, discovery=False, bins=None, window=4000):
        self.rows = []  # (id, topic, payload as stored, retain, received_at), unacknowledged
        self.lock = threading.Lock()
        path = str(tmp_path / "gateway.toml")
        write_config(path, registry_path="devices.toml", state_dir="state", broker_port=port,
                     sources=[("radio0", "/dev/null", "raw")], metrics_port=9, mqtt_extra="keepalive = %d\ndiscovery = %s\nmax_inflight = %d"
                     % (keepalive, str(bool(discovery)).lower(), window)
                     + ('\ndiscovery_mode = "%s"' % discovery if isinstance(discovery, str) else ""))
        cfg = config.load(path)
        os.makedirs(cfg.state_dir, exist_ok=True)
        self.ours, theirs = Pipe()
        wake_r, self.wake_w = os.pipe()
        self.reports, self.acked, self.next_id = [], set(), 1
        self.worker = publisher_worker.Worker(theirs, wake_r, cfg, bins or {})
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self):
        try:
            while True:
                report = self.ours.recv()
                if isinstance(report, tuple):  # ("pending", number, after, limit)
                    _, number, after, limit = report
                    with self.lock:
                        self.ours.send(("rows", number, [r for r in self.rows if r[0] > after][:limit], None))
                    continue
                self.reports.append(report)
                acked = set(report.get("acked", ()))
                with self.lock:
                    self.rows[:] = [r for r in self.rows if r[0] not in acked]
                self.acked |= acked
        except (EOFError, OSError):
            pass

    def add(self, topic, n=1):
        with self.lock:
            ids = list(range(self.next_id, self.next_id + n))
            self.rows += [(i, topic, b'{"n":%d}' % i, 0, time.time()) for i in ids]
            self.next_id += n
        os.write(self.wake_w, b"\0")
        return ids

    def count(self, key):
        return sum(r.get(key, 0) for r in self.reports)

    def connected(self):
        states = [r["connected"] for r in self.reports if "connected" in r]
        return states[-1] if states else None

    def stop(self):
        with self.lock:
            self.ours.send(("stop", 2.0))
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def log_lines(caplog):
    logs.setup("info")
    logging.getLogger("binlink").propagate = True
    caplog.set_level(logging.INFO, logger="binlink")

    def lines(text):
        return [r for r in caplog.records if text in r.getMessage()]

    yield lines
    logging.getLogger("binlink").propagate = False


def test_worker_notices_a_silent_broker_says_so_and_reconnects(tmp_path, scripted, monkeypatch, log_lines):
    run = WorkerRun(tmp_path, scripted.port, keepalive=2)
    silent = scripted.accept()  # CONNACK, then nothing
    wait_for(lambda: run.connected() is True, what="connected reported")
    t0 = time.monotonic()
    wait_for(lambda: run.connected() is False, timeout=5, what="disconnected reported")
    assert time.monotonic() - t0 <= 3.0 + 0.5  # 1.5 keepalives, and the report interval
    (line,) = log_lines("broker connection lost")
    assert line.fields["reason"] == "silent"
    peer = scripted.accept().serve()
    (row,) = run.add("binlink/t/bin/a/state")
    wait_for(lambda: row in run.acked, what="published on the new session")
    assert run.connected() is True and run.count("lost_silent") == 1 and silent is not peer
    run.stop()


@pytest.mark.parametrize("name", ["1-byte PUBLISH", "inbound QoS 2", "PUBLISH declaring 268 MB", "PUBACK of the wrong length"])
def test_worker_survives_a_malformed_packet_and_loses_nothing(tmp_path, scripted, monkeypatch, name):
    run = WorkerRun(tmp_path, scripted.port)
    first = scripted.accept()
    rows = run.add("binlink/t/bin/a/state", 5)
    assert first.packet()[0] >> 4 == 3  # publishing has begun
    first.send(MALFORMED[name])
    second = scripted.accept(timeout=5).serve()
    wait_for(lambda: set(rows) <= run.acked, what="every row acknowledged on the next session")
    assert run.thread.is_alive() and run.count("lost_protocol") == 1
    assert {p[0] for p in second.published} >= {"binlink/t/bin/a/state"}
    run.stop()


def test_worker_counts_and_logs_a_refused_subscription(tmp_path, scripted, monkeypatch, log_lines):
    run = WorkerRun(tmp_path, scripted.port, discovery=True)
    peer = scripted.accept()

    def refuse_then_serve():
        while True:
            kind, body = peer.packet()
            if kind == 0x82:
                peer.send(b"\x90\x03" + body[:2] + b"\x80")
                return
            if kind >> 4 == 3:
                peer.send(puback(struct.unpack_from("!H", body, 2 + struct.unpack_from("!H", body)[0])[0]))

    refuse_then_serve()
    peer.serve()
    wait_for(lambda: run.count("subscriptions_refused") == 1, what="refusal reported")
    (line,) = log_lines("broker refused the subscription")
    assert line.fields["topic"] == "homeassistant/status"
    run.stop()


def test_a_denied_topic_is_held_back_logged_once_and_the_rest_flows(tmp_path, scripted, monkeypatch, log_lines):
    """Mosquitto 2.0 with MQTT 3.1.1 PUBACKs a publish its ACL denies, then drops the connection."""
    monkeypatch.setattr(publisher_worker, "RECONNECT_MIN_S", 0.1)
    run = WorkerRun(tmp_path, scripted.port)
    denied_topic = "binlink/t/bin/b/state"

    def deny(peer, topic, payload, mid):
        if topic != denied_topic:
            return False
        peer.ack(mid)
        peer.close()
        return True

    scripted.serve_all(deny)
    before = run.add("binlink/t/bin/a/state", 3)
    (denied,) = run.add(denied_topic)
    after = run.add("binlink/t/bin/a/state", 3)
    wait_for(lambda: set(before + after) <= run.acked, timeout=30, what="the allowed rows published")
    later = run.add("binlink/t/bin/a/state", 3)  # publishing is not wedged behind the denied row
    wait_for(lambda: set(later) <= run.acked, what="later rows published")
    assert denied not in run.acked and [r[0] for r in run.rows] == [denied]  # still in the outbox
    (line,) = log_lines("broker denies publishing")
    assert line.fields["topic"] == denied_topic
    assert run.count("publishes_denied") == 1
    run.stop()


def test_a_denied_topic_is_tried_again_and_published_once_the_broker_allows_it(tmp_path, scripted, monkeypatch, log_lines):
    monkeypatch.setattr(publisher_worker, "RECONNECT_MIN_S", 0.1)
    monkeypatch.setattr(publisher_worker, "DENIED_RETRY_S", 2.0)
    run = WorkerRun(tmp_path, scripted.port)
    acl = {"denied": True}

    def deny(peer, topic, payload, mid):
        if topic.endswith("/b/state") and acl["denied"]:
            peer.close()  # Mosquitto 2.0.11: the connection dropped, no PUBACK at all
            return True
        return False

    scripted.serve_all(deny)
    (denied,) = run.add("binlink/t/bin/b/state")
    allowed = run.add("binlink/t/bin/a/state", 3)
    wait_for(lambda: set(allowed) <= run.acked, timeout=30, what="the allowed rows published")
    wait_for(lambda: run.count("publishes_denied") >= 2, timeout=30, what="denied, tried again, denied again")
    assert denied not in run.acked
    assert len(log_lines("broker denies publishing")) == 1  # logged once, however often tried again
    acl["denied"] = False  # the ACL fixed
    wait_for(lambda: denied in run.acked, timeout=30, what="published at the next try")
    run.stop()


def test_ten_thousand_bins_reannounced_while_readings_flow_reuse_no_packet_id(tmp_path, scripted, monkeypatch):
    """An HA restart at 10,000 bins in per-entity mode: 130,000 retained configs through the in-flight
    window, readings still published, no packet id sent again while the broker has not acknowledged it."""
    bins = {i: homeassistant.BinInfo(i, "bin-%d" % i, "", None, None, 3600) for i in range(10000)}
    run = WorkerRun(tmp_path, scripted.port, discovery="entity", bins=bins)
    n = 10000 * len(homeassistant.messages("ha", "b", "s", bins[0])) + len(
        homeassistant.gateway_messages("ha", homeassistant.GatewayInfo.of(run.worker.cfg), "entity"))
    held = []  # (packet id, when to acknowledge it)

    def hold_first_reading(peer, topic, payload, mid):
        if topic.startswith("binlink/t/bin/") and not held:
            held.append((mid, len(peer.published) + 70000))  # acknowledged once the ids have wrapped past it
            return True
        if held and len(peer.published) == held[0][1]:
            peer.ack(held[0][0])
        return False

    def configs(start=0):
        return [t for t, _, _ in peer.published[start:] if t.startswith("homeassistant/")]

    peer = scripted.accept().serve(hold_first_reading)
    wait_for(lambda: len(configs()) == n, timeout=60, what="first announcement")
    rows = run.add("binlink/t/bin/bin-0/state", 20)
    restart = len(peer.published)
    peer.send(publish_packet(b"homeassistant/status", b"online", 1))  # Home Assistant restarted
    while len(configs(restart)) < n - 10000:  # readings go on arriving during the re-announce
        rows += run.add("binlink/t/bin/bin-%d/state" % len(rows), 20)
        wait_for(lambda: len(peer.published) > restart + len(rows) * 5 or len(configs(restart)) >= n - 10000, what="progress")
    wait_for(lambda: set(rows) <= run.acked, timeout=60, what="every reading acknowledged")
    wait_for(lambda: len(set(configs(restart))) == n, timeout=60, what="every config announced again")
    readings = [i for i, (t, _, _) in enumerate(peer.published[restart:]) if t.startswith("binlink/t/bin/")]
    assert readings[len(readings) // 2] < len(peer.published) - restart - 20000  # not starved behind discovery
    assert held and peer.reused == [], peer.reused[:10]
    run.stop()


# the service side -------------------------------------------------------------------------------

def test_the_publisher_process_is_never_sent_a_key(tmp_path):
    devices = {0xA1: Device(0xA1, "bin-a", KEY, 1200, 200, "Park", 52.5, 13.4)}
    cfg = config.Config.__new__(config.Config)  # only carried, never read, by start_message()
    pub = mqtt_publisher.Publisher(cfg, devices, Metrics())
    for message in (pub.start_message(), ("bins", pub.bins)):
        data = pickle.dumps(message)
        assert KEY not in data and KEY.hex().encode() not in data
    bin_a = pub.start_message()[2][0xA1]
    assert (bin_a.bin_id, bin_a.dev, bin_a.lat, bin_a.name) == ("bin-a", "0000a1", 52.5, "Park")
    assert homeassistant.messages("ha", "b", "s", bin_a) == homeassistant.messages("ha", "b", "s", devices[0xA1])


def test_notify_never_raises_while_the_wake_pipe_is_swapped(tmp_path):
    pub = mqtt_publisher.Publisher(None, {}, Metrics())
    errors, done = [], threading.Event()

    def notifier():
        try:
            while not done.is_set():
                pub.notify()
        except Exception as e:  # what the service died of
            errors.append(e)

    t = threading.Thread(target=notifier)
    t.start()
    readers = []
    for _ in range(2000):  # a restart swaps the pipe under the notifier
        r, w = os.pipe()
        os.set_blocking(w, False)
        pub._swap_wake(w)
        readers.append(r)
    os.close(pub._wake_w)  # closed behind its back: still no exception
    pub.notify()
    pub._wake_w = None
    done.set()
    t.join(10)
    for r in readers:
        os.close(r)
    assert errors == []


# against a real Mosquitto -------------------------------------------------------------------------

def test_a_stopped_broker_is_noticed_and_nothing_is_lost(tmp_path, broker, pty, subscriber):
    from tests.harness import GatewayProcess
    from tests.test_gateway_process import DEVICES, reading

    g = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=DEVICES, mqtt_extra="keepalive = 2").start()
    try:
        wait_for(lambda: g.metric("binlink_mqtt_connected") == 1, what="connected")
        os.kill(broker.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            wait_for(lambda: g.metric("binlink_mqtt_connected") == 0, timeout=10, what="silence noticed")
            assert time.monotonic() - t0 <= 3.0 + 1.0  # 1.5 keepalives, and the metrics' report path
            pty.write(reading(1))
            wait_for(lambda: g.metric("binlink_frames_accepted_total") == 1, what="accepted meanwhile")
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        wait_for(lambda: [e["fcnt"] for e in subscriber.events()] == [1], timeout=30, what="published once back")
        assert g.metric("binlink_mqtt_sessions_lost_total", reason="silent") >= 1
        assert "reason=silent" in g.output()
    finally:
        g.kill()


def test_a_topic_denied_by_the_broker_acl_stays_in_the_outbox_and_the_rest_flows(tmp_path, pty):
    from binlink.sim.broker import Mosquitto
    from tests.harness import GatewayProcess
    from tests.test_gateway_process import reading

    b = Mosquitto()
    acl = os.path.join(b.dir, "acl")  # the broker's folder: readable by the user Mosquitto drops to
    with open(acl, "w") as f:
        f.write("topic readwrite #\ntopic deny binlink/testcity/bin/bin-b/#\n")
    os.chmod(acl, 0o644)
    with open(b.conf, "a") as f:
        f.write("acl_file %s\n" % acl)
    b.start()
    sub = Subscriber(b.port)
    g = GatewayProcess(tmp_path, b.port, [("radio0", pty.link, "raw")],
                       devices=[(0xA1, "bin-a", KEY, 1200, 200), (0xB2, "bin-b", KEY, 1200, 200)]).start()
    try:
        from binlink.wire import codec, framing

        for n in range(1, 4):
            pty.write(reading(n))
            pty.write(framing.frame(codec.encode_reading(KEY, 0xB2, n, 700, 20, 3700)))
        wait_for(lambda: sorted({e["fcnt"] for e in sub.events() if e["bin_id"] == "bin-a"}) == [1, 2, 3],
                 timeout=60, what="bin-a's readings published")
        wait_for(lambda: g.metric("binlink_mqtt_publishes_denied_total") >= 1, timeout=60, what="denial counted")
        pty.write(reading(4))
        wait_for(lambda: 4 in {e["fcnt"] for e in sub.events() if e["bin_id"] == "bin-a"}, timeout=60,
                 what="publishing goes on")
        assert not [e for e in sub.events() if e["bin_id"] == "bin-b"]
        assert g.metric("binlink_outbox_depth") >= 3  # bin-b's readings wait in the outbox
        denials = [l for l in g.output().splitlines() if "broker denies publishing" in l]
        assert denials and all("bin-b" in l for l in denials)
        assert len({l.split("topic=")[1] for l in denials}) == len(denials)  # once per topic
    finally:
        g.kill()
        sub.close()
        b.stop()
