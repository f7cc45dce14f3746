"""A batched MQTT 3.1.1 QoS 1 client for the publisher process: what the outbox needs, nothing more.

Why not paho (measured side by side, docs/gateway.md): paho builds a ReasonCode and a Properties
object per PUBACK, rescans its in-flight window per PUBACK and takes a Condition per message.
Here a window's worth of PUBLISH packets is one `sendall`, and a read of PUBACKs is one loop over
4-byte packets. Single-threaded: the caller drives it with select() on fileno().

Covers: CONNECT with clean session, last will, username/password, keepalive; TLS through the
standard ssl module; PUBLISH QoS 0/1 out; PUBACK in; SUBSCRIBE and PUBLISH in (QoS 0/1, acked);
PINGREQ; DISCONNECT. Not covered (not needed here): QoS 2, MQTT 5."""
import socket
import ssl
import struct
import time

CONNACK_REASONS = {
    1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
    4: "bad username or password", 5: "not authorised",
}


class Refused(Exception):
    """The broker answered CONNECT with a refusal (bad credentials, not authorised, ...)."""


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
    """One connection to the broker. Raises OSError / ssl.SSLError / Refused; a lost connection
    is a ConnectionError from read() or publish/flush. Message ids wrap at 65535."""

    def __init__(self, host, port, client_id, keepalive=30, username="", password="", will=None, tls=None,
                 timeout=10.0):
        """will: (topic, payload, retain) sent at QoS 1 by the broker if this session dies."""
        self.host, self.port = host, port
        self.keepalive = keepalive
        self._out = []  # packets queued by publish(), sent by flush()
        self._in = bytearray()
        self._mid = 0
        self._last_sent = time.monotonic()
        raw = socket.create_connection((host, port), timeout=timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
            self._send(self._connect_packet(client_id, keepalive, username, password, will))
            self._await_connack(timeout)
        except BaseException:
            raw.close()
            raise
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
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("broker closed the connection before CONNACK")
            self._in += data
        if self._in[0] != 0x20:
            raise ConnectionError("expected CONNACK, got packet type 0x%02x" % self._in[0])
        rc = self._in[3]
        del self._in[:4]
        if rc:
            raise Refused(CONNACK_REASONS.get(rc, "refused (code %d)" % rc))

    def fileno(self):
        return self.sock.fileno()

    def pending(self):
        """Bytes already decrypted by TLS and waiting: select() does not see them."""
        return self.sock.pending() if isinstance(self.sock, ssl.SSLSocket) else 0

    def next_mid(self):
        self._mid = self._mid % 65535 + 1
        return self._mid

    def publish(self, topic, payload, retain=False, qos=1):
        """Queues one PUBLISH (sent by flush()); returns its message id (None at QoS 0).
        topic: bytes or str; payload: bytes or str."""
        if isinstance(topic, str):
            topic = topic.encode()
        if isinstance(payload, str):
            payload = payload.encode()
        if qos:
            mid = self.next_mid()
            head = _utf8(topic) + struct.pack("!H", mid)
        else:
            mid = None
            head = _utf8(topic)
        self._out.append(bytes([0x30 | (qos << 1) | (1 if retain else 0)]) + _varint(len(head) + len(payload)) + head)
        self._out.append(payload)
        return mid

    def subscribe(self, topic, qos=1):
        body = struct.pack("!H", self.next_mid()) + _utf8(topic) + bytes([qos])
        self._out.append(b"\x82" + _varint(len(body)) + body)

    def flush(self):
        if self._out:
            data, self._out = b"".join(self._out), []
            self._send(data)

    def _send(self, data):
        self.sock.sendall(data)
        self._last_sent = time.monotonic()

    def ping_if_due(self, now):
        """A PINGREQ when nothing was sent for half the keepalive: the broker drops silent clients."""
        if self.keepalive and now - self._last_sent >= self.keepalive / 2:
            self._send(b"\xc0\x00")

    def read(self):
        """Reads what is there (call when select() says readable, or pending() > 0).
        Returns (acknowledged message ids, [(topic, payload)] received)."""
        try:
            data = self.sock.recv(65536)
        except ssl.SSLWantReadError:
            return [], []
        if not data:
            raise ConnectionError("broker closed the connection")
        buf = self._in
        buf += data
        acked = []
        received = []
        i, n = 0, len(buf)
        while i + 2 <= n:
            kind = buf[i]
            if kind == 0x40 and i + 4 <= n and buf[i + 1] == 2:  # PUBACK, by far the most common
                acked.append(buf[i + 2] << 8 | buf[i + 3])
                i += 4
                continue
            length, shift, j = 0, 0, i + 1
            while j < n:
                length |= (buf[j] & 0x7F) << shift
                shift += 7
                j += 1
                if not buf[j - 1] & 0x80:
                    break
            else:
                break  # length not complete yet
            if j + length > n:
                break
            if kind >> 4 == 3:  # PUBLISH from a subscription
                received.append(self._incoming(kind, bytes(buf[j:j + length])))
            i = j + length  # SUBACK, PINGRESP and the rest need no action
        del buf[:i]
        if received:
            self.flush()  # PUBACKs for QoS 1 messages received
        return acked, received

    def _incoming(self, kind, body):
        (tlen,) = struct.unpack_from("!H", body)
        topic = body[2:2 + tlen].decode("utf-8", "replace")  # the spec says UTF-8; never crash on it
        pos = 2 + tlen
        if (kind >> 1) & 3:
            (mid,) = struct.unpack_from("!H", body, pos)
            pos += 2
            self._out.append(b"\x40\x02" + struct.pack("!H", mid))
        return topic, body[pos:]

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
