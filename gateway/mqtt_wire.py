"""A batched MQTT 3.1.1 QoS 1 client for the publisher process: what the outbox needs, nothing more.

Why not a library (measured side by side, docs/architecture.md "The MQTT client"): paho builds a
ReasonCode and a Properties object per PUBACK and rescans its in-flight window per PUBACK; gmqtt
has no per-message acknowledgement hook. Here a window's worth of PUBLISH packets is one
`sendall`, and a read of PUBACKs is one loop over 4-byte packets. Single-threaded: the caller
drives it with select() on fileno(), waking by next_due() for tick().

Covers: CONNECT with clean session, last will, username/password, keepalive; TLS through the
standard ssl module; PUBLISH QoS 0/1 out; PUBACK in; SUBSCRIBE and PUBLISH in (QoS 0/1, acked);
PINGREQ/PINGRESP; DISCONNECT. Anything else from the broker ends the session (ProtocolError):
QoS 2, MQTT 5 are not spoken here.

Hostile or broken brokers (tests/test_mqtt_hostile.py): a broker silent for half a keepalive is
pinged, and one that then stays silent for another half ends the session (BrokerSilent); malformed
or oversized packets end it (ProtocolError), never an exception of another kind; a packet id is
never reused while in flight; a PUBACK counts only once a later packet from the broker proves the
session was still alive after it (a broker may PUBACK a publish its ACL denies, then drop the
connection; publish_policy.DenialFinder works out which publish that was)."""
import select
import socket
import ssl
import struct
import time

CONNACK_REASONS = {
    1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
    4: "bad username or password", 5: "not authorised",
}
MAX_INBOUND = 256 * 1024  # the publisher subscribes to Home Assistant's status only: larger is a broken broker
MAX_MID = 65535


class Refused(Exception):
    """The broker answered CONNECT with a refusal (bad credentials, not authorised, ...)."""


class ProtocolError(ConnectionError):
    """The broker sent something MQTT 3.1.1 does not allow this client to receive: the session ends."""


class BrokerSilent(ConnectionError):
    """No answer to a PINGREQ: the broker (or the path to it) is gone though TCP has not noticed."""


def _varint(n):
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def tls_context(ca_file="", cert_file="", key_file=""):
    """Server certificate verified against ca_file (the system store when empty); optional client cert."""
    ctx = ssl.create_default_context(cafile=ca_file or None)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file or None)
    return ctx


class Session:
    """One connection to the broker. Raises OSError / ssl.SSLError / Refused / ConnectionError (its
    subclasses ProtocolError and BrokerSilent included) on connect, read(), flush() and tick()."""

    def __init__(self, host, port, client_id, keepalive=30, username="", password="", will=None, tls=None,
                 timeout=10.0):
        """will: (topic, payload, retain) sent at QoS 1 by the broker if this session dies."""
        if not 0 <= keepalive <= 65535:
            raise ValueError("keepalive must be 0 to 65535 s, not %r" % (keepalive,))
        self.host, self.port = host, port
        self.keepalive = keepalive
        self._out = []  # packets queued by publish(), sent by flush()
        self._in = bytearray()
        self._mid = 0
        self._in_use = set()  # packet ids sent and not yet acknowledged (PUBLISH and SUBSCRIBE)
        self._subscribing = {}  # packet id -> topic, until its SUBACK
        self.subscribed = set()  # topics the broker granted
        self.refused = []  # topics whose SUBSCRIBE the broker refused (SUBACK 0x80); the caller takes them
        self.unproven_ack = None  # the last PUBACK read: counted once a later packet proves the session alive
        self._ping_sent = None  # monotonic time of the PINGREQ not yet answered
        self._failed = False  # salvage(): read what is left, send nothing more
        raw = socket.create_connection((host, port), timeout=timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
            self._send(self._connect_packet(client_id, keepalive, username, password, will))
            self._await_connack(timeout)
        except BaseException:
            raw.close()
            raise
        self._last_received = time.monotonic()
        self.sock.settimeout(timeout)  # sends: a broker that stops reading for this long is gone

    @staticmethod
    def _connect_packet(client_id, keepalive, username, password, will):
        flags = 0x02  # clean session: the outbox, not the broker, holds what is unacknowledged
        payload = _utf8(client_id)
        if will is not None:
            topic, message, retain = will
            flags |= 0x04 | 0x08 | (0x20 if retain else 0)  # will, QoS 1, retain
            payload += _utf8(topic) + _utf8(message)
        if username:
            flags |= 0x80
            payload += _utf8(username)
            if password:
                flags |= 0x40
                payload += _utf8(password)
        body = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload
        return b"\x10" + _varint(len(body)) + body

    def _await_connack(self, timeout):
        deadline = time.monotonic() + timeout
        while len(self._in) < 4:
            if len(self._in) >= 2 and (self._in[0] != 0x20 or self._in[1] != 2):
                break  # wrong already: say so without waiting for more
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("broker closed the connection before CONNACK")
            self._in += data
        if self._in[0] != 0x20:
            raise ProtocolError("expected CONNACK, got packet type 0x%02x" % self._in[0])
        if self._in[1] != 2:
            raise ProtocolError("CONNACK of length %d (MQTT 3.1.1 says 2)" % self._in[1])
        if self._in[2]:
            raise ProtocolError("CONNACK says a session is present, for a clean session")
        rc = self._in[3]
        del self._in[:4]
        if rc:
            raise Refused(CONNACK_REASONS.get(rc, "refused (code %d)" % rc))

    def fileno(self):
        return self.sock.fileno()

    def pending(self):
        """Bytes already decrypted by TLS and waiting: select() does not see them."""
        return self.sock.pending() if isinstance(self.sock, ssl.SSLSocket) else 0

    def _next_mid(self):
        in_use = self._in_use
        if len(in_use) >= MAX_MID:
            raise OverflowError("all %d packet ids are in flight" % MAX_MID)
        mid = self._mid % MAX_MID + 1
        while mid in in_use:
            mid = mid % MAX_MID + 1
        self._mid = mid
        in_use.add(mid)
        return mid

    def publish(self, topic, payload, retain=False, qos=1):
        """Queues one PUBLISH (sent by flush()); returns its message id (None at QoS 0).
        topic: bytes or str; payload: bytes or str."""
        if isinstance(topic, str):
            topic = topic.encode()
        if isinstance(payload, str):
            payload = payload.encode()
        if qos:
            mid = self._next_mid()
            head = _utf8(topic) + struct.pack("!H", mid)
        else:
            mid = None
            head = _utf8(topic)
        self._out.append(bytes([0x30 | (qos << 1) | (1 if retain else 0)]) + _varint(len(head) + len(payload)) + head)
        self._out.append(payload)
        return mid

    def subscribe(self, topic, qos=1):
        """Queues a SUBSCRIBE; the SUBACK puts the topic in `subscribed`, or in `refused`."""
        mid = self._next_mid()
        self._subscribing[mid] = topic
        body = struct.pack("!H", mid) + _utf8(topic) + bytes([qos])
        self._out.append(b"\x82" + _varint(len(body)) + body)
        return mid

    def flush(self):
        if self._out:
            data, self._out = b"".join(self._out), []
            self._send(data)

    def _send(self, data):
        self.sock.sendall(data)
        self._last_sent = time.monotonic()

    def _ping(self, now):
        self._send(b"\xc0\x00")
        self._ping_sent = now

    def next_due(self):
        """When tick() has something to do (monotonic time); None without a keepalive."""
        if not self.keepalive:
            return None
        half = self.keepalive / 2
        if self._ping_sent is not None:
            return max(self._ping_sent, self._last_received) + half
        return min(self._last_sent, self._last_received) + half

    def tick(self, now):
        """Keepalive, both ways: a PINGREQ after half a keepalive without sending or without hearing
        from the broker; BrokerSilent when nothing came back for another half (1 keepalive in all,
        inside the 1.5 a broker allows a client)."""
        due = self.next_due()
        if due is None or now < due:
            return
        if self._ping_sent is not None:
            raise BrokerSilent("no answer from the broker for %.1f s (keepalive %d s)"
                               % (now - self._last_received, self.keepalive))
        self._ping(now)

    def read(self):
        """Reads what is there (call when select() says readable, or pending() > 0).
        Returns (acknowledged message ids, [(topic, payload)] received)."""
        try:
            data = self.sock.recv(65536)
        except ssl.SSLWantReadError:
            return [], []
        if not data:
            raise ConnectionError("broker closed the connection")
        self._last_received = time.monotonic()
        buf = self._in
        buf += data
        acked = []
        received = []
        i, n = 0, len(buf)
        other_end = -1  # where the last packet other than a PUBACK ended
        while i + 2 <= n:
            kind = buf[i]
            if kind == 0x40 and buf[i + 1] == 2:  # PUBACK, by far the most common
                if i + 4 > n:
                    break
                acked.append(buf[i + 2] << 8 | buf[i + 3])
                i += 4
                continue
            length, shift, j = 0, 0, i + 1
            while j < n:
                if j - i > 4:
                    raise ProtocolError("remaining length longer than 4 bytes")
                length |= (buf[j] & 0x7F) << shift
                shift += 7
                j += 1
                if not buf[j - 1] & 0x80:
                    break
            else:
                if j - i > 4:
                    raise ProtocolError("remaining length longer than 4 bytes")
                break  # length not complete yet
            if length > MAX_INBOUND:
                raise ProtocolError("packet of %d bytes declared (at most %d taken)" % (length, MAX_INBOUND))
            if j + length > n:
                break
            self._packet(kind, bytes(buf[j:j + length]), received)
            i = other_end = j + length
        del buf[:i]
        if i:  # a complete packet arrived: the PUBACK held back from the previous read was not the last word
            if self.unproven_ack is not None:
                acked.insert(0, self.unproven_ack)
                self.unproven_ack = None
            if acked and other_end != i:
                self.unproven_ack = acked.pop()
        self._in_use.difference_update(acked)
        if self._failed:
            return acked, received
        if self.unproven_ack is not None and len(self._in_use) <= 1 and self._ping_sent is None:
            self._ping(self._last_received)  # nothing else will come to prove it: ask for a PINGRESP
        if received:
            self.flush()  # PUBACKs for QoS 1 messages received
        return acked, received

    def salvage(self):
        """After the session failed (a send failed, or the broker went silent): the acknowledgements
        already received and not yet read, proven ones returned, the last one left in unproven_ack.
        A broker that denies a publish and drops the connection resets it, and the send that meets the
        reset fails before its PUBACK is read."""
        self._failed = True
        acked = []
        try:
            self.sock.setblocking(False)
            while True:
                acked += self.read()[0]
        except (OSError, ValueError):  # nothing more queued (BlockingIOError), closed, reset, malformed
            pass
        return acked

    def _packet(self, kind, body, received):
        """One packet other than a plain PUBACK; raises ProtocolError for what may not come."""
        kind_type = kind >> 4
        if kind_type == 3:
            received.append(self._incoming(kind, body))
        elif kind == 0xD0 and not body:
            self._ping_sent = None  # PINGRESP
        elif kind == 0x90 and len(body) == 3:
            (mid,) = struct.unpack_from("!H", body)
            topic = self._subscribing.pop(mid, None)
            if topic is None:
                raise ProtocolError("SUBACK for packet id %d, never subscribed" % mid)
            self._in_use.discard(mid)
            if body[2] == 0x80:
                self.refused.append(topic)
            elif body[2] <= 2:
                self.subscribed.add(topic)
            else:
                raise ProtocolError("SUBACK return code 0x%02x" % body[2])
        else:
            raise ProtocolError("unexpected packet 0x%02x of %d bytes" % (kind, len(body)))

    def _incoming(self, kind, body):
        qos = (kind >> 1) & 3
        if qos > 1:  # subscribed at QoS 1: the broker may not send more, and QoS 2 is not spoken here
            raise ProtocolError("PUBLISH at QoS %d" % qos)
        if len(body) < 2:
            raise ProtocolError("PUBLISH of %d bytes" % len(body))
        (tlen,) = struct.unpack_from("!H", body)
        pos = 2 + tlen + (2 if qos else 0)
        if pos > len(body):
            raise ProtocolError("PUBLISH shorter than its topic and packet id")
        topic = body[2:2 + tlen].decode("utf-8", "replace")  # the spec says UTF-8; never crash on it
        if qos:
            self._out.append(b"\x40\x02" + body[pos - 2:pos])
        return topic, body[pos:]

    def publish_and_wait(self, topic, payload, retain=False, timeout=2.0):
        """Publishes one message and waits (bounded) for its acknowledgement; returns the message ids
        acknowledged meanwhile, its own among them unless the time ran out or the connection failed."""
        mid = self.publish(topic, payload, retain)
        acked = []
        try:
            self.flush()
            deadline = time.monotonic() + timeout
            while mid not in acked and time.monotonic() < deadline:
                if self.pending() or select.select([self], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    acked += self.read()[0]
        except OSError:
            pass
        return acked

    def disconnect(self):
        try:
            self.flush()
            self._send(b"\xe0\x00")
        except OSError:
            pass
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
