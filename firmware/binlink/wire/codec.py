# binlink wire codec: one source for MicroPython (firmware) and CPython (gateway).
# Every byte is documented in docs/protocol.md; tests/vectors/frames.json pins it.
import struct
import hashlib

_COPY = hasattr(hashlib.sha256(), "copy")  # CPython: a hash state can be copied; MicroPython's cannot

VERSION = 1  # layout of reading and backlog frames, and of the hello old firmware sends
HELLO_VERSION = 2  # the hello that carries the full 32-bit counter (docs/protocol.md, Counter)
ECHO_MAX = 2  # a reading frame of version 1 + n repeats n earlier readings (firmware 1.7.0; docs/protocol.md)
T_READING = 1
T_BACKLOG = 2
T_HELLO = 3
TYPE_NAMES = {T_READING: "reading", T_BACKLOG: "backlog", T_HELLO: "hello"}

TAG_LEN = 4
HEADER_LEN = 6  # version/type, device id (3), fcnt low 16 bits (2)
READING_LEN = 6  # distance (2), temperature, battery, flags, quality
ENTRY_LEN = 9  # fcnt back (1), age minutes (2), reading body (6)
HELLO_LEN = 8  # fw version (3), reset cause, config hash (4)
HELLO2_LEN = 10  # fcnt high 16 bits (2), then the version 1 hello body
MAX_DEVICE_ID = 0xFFFFFF
MAX_FCNT = 0xFFFFFFFF
MAX_FCNT_GAP = 0x4000  # larger jumps than this are refused, as LoRaWAN does
NO_DISTANCE = 0xFFFF
NO_TEMPERATURE = -128

# status flags (one byte)
F_SENSOR_FAULT = 0x01
F_TILT = 0x02
F_LOW_BATTERY = 0x04
F_FIRE = 0x08
F_BLIND_ZONE = 0x10  # echo closer than the sensor's blind zone: bin is full to the lid
F_ALARM_WAKE = 0x20  # sent early because of an alarm input
F_BACKLOG = 0x40  # unsent readings are waiting on the device
FLAG_NAMES = (
    (F_SENSOR_FAULT, "sensor_fault"),
    (F_TILT, "tilt"),
    (F_LOW_BATTERY, "low_battery"),
    (F_FIRE, "fire"),
    (F_BLIND_ZONE, "blind_zone"),
    (F_ALARM_WAKE, "alarm_wake"),
    (F_BACKLOG, "backlog"),
)

RESET_CAUSES = ("unknown", "power_on", "hard", "watchdog", "deepsleep", "soft", "brownout")


class ProtocolError(Exception):
    """A frame was rejected; `reason` is a stable code (docs/protocol.md lists them)."""

    def __init__(self, reason, detail="", fcnt=None):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail
        self.fcnt = fcnt  # the full counter the frame carried, when known (replay)


def _sha256(data):
    return hashlib.sha256(data).digest()


_PADS = {}  # key -> (inner, outer) SHA-256 states after the padded key; CPython only
_PADS_MAX = 16384  # a fleet's keys; forgotten all at once beyond (re-keying leaves old ones behind)


def _padded_states(key):
    """RFC 2104: SHA-256 states after the key XOR ipad and after the key XOR opad."""
    if len(key) > 64:
        key = _sha256(key)
    key = key + bytes(64 - len(key))
    return hashlib.sha256(bytes(b ^ 0x36 for b in key)), hashlib.sha256(bytes(b ^ 0x5C for b in key))


def hmac_sha256(key, msg):
    if _COPY:
        # the key's padded states made once and copied per frame: half the work of hmac.digest, and
        # the GIL is kept (OpenSSL's one-shot HMAC releases it, handing the CPU to the reader thread)
        pads = _PADS.get(key)
        if pads is None:
            if len(_PADS) >= _PADS_MAX:
                _PADS.clear()
            pads = _PADS[key] = _padded_states(key)
        inner, outer = pads[0].copy(), pads[1].copy()
    else:
        inner, outer = _padded_states(key)
    inner.update(msg)
    outer.update(inner.digest())
    return outer.digest()


def tag(key, fcnt, body):
    """4-byte tag over the full 32-bit counter followed by every frame byte before the tag."""
    return hmac_sha256(key, struct.pack(">I", fcnt) + body)[:TAG_LEN]


def _check_key(key):
    if len(key) != 16:
        raise ValueError("device key must be 16 bytes")


def _header(ftype, device_id, fcnt, version=VERSION):
    if not 0 <= device_id <= MAX_DEVICE_ID:
        raise ValueError("device id out of range")
    if not 0 <= fcnt <= MAX_FCNT:
        raise ValueError("frame counter out of range")
    return struct.pack(">BBHH", (version << 4) | ftype, device_id >> 16, device_id & 0xFFFF, fcnt & 0xFFFF)


def _clamp(v, lo, hi):
    return lo if v < lo else hi if v > hi else v


def pack_reading(distance_mm, temperature_c, battery_mv, flags=0, valid_pings=0, pings=0):
    """The 6-byte reading body shared by reading frames and backlog entries."""
    d = NO_DISTANCE if distance_mm is None else _clamp(int(distance_mm), 0, NO_DISTANCE - 1)
    t = NO_TEMPERATURE if temperature_c is None else _clamp(int(round(temperature_c)), -127, 127)
    b = _clamp((int(battery_mv) - 2000 + 5) // 10, 0, 255)
    q = (_clamp(valid_pings, 0, 15) << 4) | _clamp(pings, 0, 15)
    return struct.pack(">HbBBB", d, t, b, flags & 0xFF, q)


def _sign(key, fcnt, body):
    _check_key(key)
    return body + tag(key, fcnt, body)


def encode_reading(key, device_id, fcnt, distance_mm, temperature_c, battery_mv, flags=0, valid_pings=0, pings=0):
    return encode_reading_body(
        key, device_id, fcnt, pack_reading(distance_mm, temperature_c, battery_mv, flags, valid_pings, pings)
    )


def encode_reading_body(key, device_id, fcnt, body, echoes=()):
    """echoes: up to ECHO_MAX (fcnt, age_minutes, body) of earlier readings not yet acknowledged,
    oldest first, repeated after this one: a reading frame of version 1 + len(echoes)."""
    if len(echoes) > ECHO_MAX:
        raise ValueError("a reading frame repeats at most %d readings" % ECHO_MAX)
    return _sign(key, fcnt, _header(T_READING, device_id, fcnt, VERSION + len(echoes)) + body
                 + b"".join(_entry(fcnt, e) for e in echoes))


def _entry(fcnt, e):
    """A backlog entry: (fcnt, age_minutes, body) as its counter's offset below fcnt, age, body."""
    back = fcnt - e[0]
    if not 1 <= back <= 255:
        raise ValueError("an earlier reading's counter must be 1..255 below the frame's")
    return struct.pack(">BH", back, _clamp(int(e[1]), 0, 0xFFFF)) + e[2]


def encode_backlog(key, device_id, fcnt, entries):
    """entries: list of (fcnt, age_minutes, body), body from pack_reading(); oldest first."""
    if not 1 <= len(entries) <= 255:
        raise ValueError("a backlog batch holds 1..255 readings")
    parts = [_header(T_BACKLOG, device_id, fcnt), bytes([len(entries)])]
    for e in entries:
        parts.append(_entry(fcnt, e))
    return _sign(key, fcnt, b"".join(parts))


def encode_hello(key, device_id, fcnt, fw_version, reset_cause, config_hash, version=HELLO_VERSION):
    """fw_version: (major, minor, patch); reset_cause: index into RESET_CAUSES; config_hash: 4 bytes.

    Version 2 (the default) also carries the counter's high 16 bits, so any gateway can take up
    the bin's counter from it; version 1 is what firmware before 1.1 sends."""
    if len(config_hash) != 4:
        raise ValueError("config hash must be 4 bytes")
    body = _header(T_HELLO, device_id, fcnt, version)
    if version == HELLO_VERSION:
        body += struct.pack(">H", fcnt >> 16)
    body += bytes([fw_version[0] & 0xFF, fw_version[1] & 0xFF, fw_version[2] & 0xFF, reset_cause & 0xFF]) + bytes(config_hash)
    return _sign(key, fcnt, body)


def _hello_body_at(frame):
    """Offset of the firmware version in a hello: after the counter's high bits in version 2."""
    return HEADER_LEN + 2 if frame[0] >> 4 == HELLO_VERSION else HEADER_LEN


def explicit_fcnt(frame):
    """The full counter a version 2 hello carries on air, or None (other frames carry 16 bits)."""
    if frame[0] == (HELLO_VERSION << 4) | T_HELLO:
        return (frame[HEADER_LEN] << 24) | (frame[HEADER_LEN + 1] << 16) | (frame[4] << 8) | frame[5]
    return None


def expected_length(ftype, frame):
    if ftype == T_READING:
        return HEADER_LEN + READING_LEN + ENTRY_LEN * ((frame[0] >> 4) - VERSION) + TAG_LEN
    if ftype == T_HELLO:
        return HEADER_LEN + (HELLO2_LEN if frame[0] >> 4 == HELLO_VERSION else HELLO_LEN) + TAG_LEN
    if len(frame) < HEADER_LEN + 1:
        return HEADER_LEN + 1 + ENTRY_LEN + TAG_LEN
    return HEADER_LEN + 1 + ENTRY_LEN * frame[HEADER_LEN] + TAG_LEN


def parse_header(frame):
    """Returns (frame type, device id, fcnt low 16 bits); checks version, type and length."""
    if len(frame) < HEADER_LEN + TAG_LEN:
        raise ProtocolError("truncated", "%d bytes" % len(frame))
    version = frame[0] >> 4
    ftype = frame[0] & 0x0F
    if version != VERSION and not (version == HELLO_VERSION and ftype == T_HELLO) and not (
            ftype == T_READING and VERSION < version <= VERSION + ECHO_MAX):
        raise ProtocolError("bad_version", "version %d %s, this side speaks %d (2 for hello, up to %d for reading)"
                            % (version, TYPE_NAMES.get(ftype, "type %d" % ftype), VERSION, VERSION + ECHO_MAX))
    if ftype not in TYPE_NAMES:
        raise ProtocolError("bad_type", "type %d" % ftype)
    if ftype == T_BACKLOG and len(frame) > HEADER_LEN and frame[HEADER_LEN] == 0:
        raise ProtocolError("bad_length", "empty backlog batch")
    want = expected_length(ftype, frame)
    if len(frame) < want:
        raise ProtocolError("truncated", "%d of %d bytes" % (len(frame), want))
    if len(frame) > want:
        raise ProtocolError("bad_length", "%d bytes, expected %d" % (len(frame), want))
    device_id = (frame[1] << 16) | (frame[2] << 8) | frame[3]
    return ftype, device_id, (frame[4] << 8) | frame[5]


def candidate_fcnt(fcnt_low, last_fcnt):
    """Full 32-bit counter for 16 received bits, the first value above last_fcnt (None: never seen)."""
    if last_fcnt is None:
        return fcnt_low
    full = (last_fcnt & 0xFFFF0000) | fcnt_low
    if full <= last_fcnt:
        full += 0x10000
    return full


def _tag_ok(key, fcnt, frame):
    if fcnt > MAX_FCNT:
        return False
    want = tag(key, fcnt, frame[:-TAG_LEN])
    got = frame[-TAG_LEN:]
    diff = 0
    for i in range(TAG_LEN):  # constant time: no early exit on the first differing byte
        diff |= want[i] ^ got[i]
    return diff == 0


def verify(frame, key, last_fcnt=None, header=None):
    """Checks the tag and the counter; returns the full 32-bit frame counter.

    Raises ProtocolError: bad_tag (wrong key, forged or corrupted), replay (counter not above
    last_fcnt), fcnt_gap (counter jumped further than MAX_FCNT_GAP).

    A version 2 hello names its full counter, so no reconstruction is needed and no gap is too
    large: the tag over that counter is the proof, and a counter not above last_fcnt is a replay.
    header: what parse_header(frame) returned, when the caller has it already."""
    _check_key(key)
    fcnt_low = (header or parse_header(frame))[2]
    explicit = explicit_fcnt(frame)
    if explicit is not None:
        if not _tag_ok(key, explicit, frame):
            raise ProtocolError("bad_tag")
        if last_fcnt is not None and explicit <= last_fcnt:
            raise ProtocolError("replay", "counter %d, last accepted %d" % (explicit, last_fcnt), explicit)
        return explicit
    full = candidate_fcnt(fcnt_low, last_fcnt)
    if _tag_ok(key, full, frame):
        if last_fcnt is not None and full - last_fcnt > MAX_FCNT_GAP:
            raise ProtocolError("fcnt_gap", "counter jumped from %d to %d" % (last_fcnt, full))
        return full
    if last_fcnt is not None:
        # Same 16 bits in the current epoch at or below the last accepted counter: a replay.
        old = (last_fcnt & 0xFFFF0000) | fcnt_low
        if old <= last_fcnt and _tag_ok(key, old, frame):
            raise ProtocolError("replay", "counter %d, last accepted %d" % (old, last_fcnt), old)
    raise ProtocolError("bad_tag")


def verify_before(frame, key, anchor, floor=None):
    """The counter of a frame sent before `anchor` (a resynchronising hello's counter) and after
    `floor` (the last counter accepted before, None: none): the latest value below anchor with
    the frame's 16 bits, so at most 65 535 back. Raises bad_tag when the tag does not verify
    with it, replay when it is not above floor. One tag check: no weaker than verify()."""
    _check_key(key)
    fcnt_low = parse_header(frame)[2]
    if explicit_fcnt(frame) is not None:
        raise ProtocolError("bad_field", "a version 2 hello is verified by verify()")
    full = (anchor & 0xFFFF0000) | fcnt_low
    if full >= anchor:
        full -= 0x10000
    if full < 0 or not _tag_ok(key, full, frame):
        raise ProtocolError("bad_tag")
    if floor is not None and full <= floor:
        raise ProtocolError("replay", "counter %d, last accepted %d" % (full, floor), full)
    return full


def _reading_fields(frame, i):
    d, t, b, flags, q = struct.unpack_from(">HbBBB", frame, i)
    return (None if d == NO_DISTANCE else d, None if t == NO_TEMPERATURE else t, 2000 + 10 * b, flags, q >> 4, q & 0x0F)


def _entries(frame, fcnt, p, n):
    out = []
    for _ in range(n):
        back, age = struct.unpack_from(">BH", frame, p)
        if back == 0 or back > fcnt:
            raise ProtocolError("bad_field", "backlog entry counter offset %d" % back)
        out.append((fcnt - back, age) + _reading_fields(frame, p + 3))
        p += ENTRY_LEN
    return out


def readings(frame, fcnt):
    """The readings of a verified reading or backlog frame, oldest first, as tuples: (fcnt, age in
    minutes, distance_mm, temperature_c, battery_mv, flag bits, valid_pings, pings). Flags stay
    bits here: the gateway names them only when it renders a message. A reading frame of version
    2 or 3 gives its echoes, then its own reading."""
    ftype = frame[0] & 0x0F
    if ftype == T_READING:
        return (_entries(frame, fcnt, HEADER_LEN + READING_LEN, (frame[0] >> 4) - VERSION)
                + [(fcnt, 0) + _reading_fields(frame, HEADER_LEN)])
    if ftype == T_BACKLOG:
        return _entries(frame, fcnt, HEADER_LEN + 1, frame[HEADER_LEN])
    return []


def hello_fields(frame):
    """(firmware version "x.y.z", reset cause name, config hash hex) of a verified hello."""
    p = _hello_body_at(frame)
    cause = frame[p + 3]
    return ("%d.%d.%d" % (frame[p], frame[p + 1], frame[p + 2]),
            RESET_CAUSES[cause] if cause < len(RESET_CAUSES) else "unknown", bytes(frame[p + 4 : p + 8]).hex())


_READING_KEYS = ("distance_mm", "temperature_c", "battery_mv", "flags", "valid_pings", "pings")


def _reading_dict(fields):
    out = dict(zip(_READING_KEYS, fields))
    out["flags"] = flag_names(out["flags"])
    return out


def flag_names(flags):
    return [name for bit, name in FLAG_NAMES if flags & bit]


def flag_bits(names):
    bits = 0
    for bit, name in FLAG_NAMES:
        if name in names:
            bits |= bit
    return bits


def decode_body(frame, fcnt):
    """Decodes a frame already verified (tag and counter, after parse_header) into a dict."""
    ftype = frame[0] & 0x0F
    device_id = (frame[1] << 16) | (frame[2] << 8) | frame[3]
    out = {"type": TYPE_NAMES[ftype], "version": frame[0] >> 4, "device_id": device_id, "fcnt": fcnt}
    if ftype == T_HELLO:
        out["fw_version"], out["reset_cause"], out["config_hash"] = hello_fields(frame)
    elif ftype == T_READING:
        got = readings(frame, fcnt)
        out.update(_reading_dict(got[-1][2:]))
        if len(got) > 1:
            out["echoes"] = [_entry_dict(r) for r in got[:-1]]
    else:
        out["readings"] = [_entry_dict(r) for r in readings(frame, fcnt)]
    return out


def _entry_dict(r):
    entry = {"fcnt": r[0], "age_min": r[1]}
    entry.update(_reading_dict(r[2:]))
    return entry


def decode(frame, key, last_fcnt=None):
    """Verify and decode in one call (the `binlink decode` command and the tests use it)."""
    return decode_body(frame, verify(frame, key, last_fcnt))
