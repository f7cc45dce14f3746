# binlink downlink: gateway -> bin, sent in the bin's receive window after one of its uplinks.
# One source for MicroPython (the bin parses) and CPython (the gateway encodes); every byte is in
# docs/protocol.md, "Downlink"; tests/vectors/downlink.json pins it.
#
# A downlink answers exactly one uplink: its tag covers that uplink's full 32-bit counter, which
# only ever rises, so a recorded downlink is worth nothing in any later window (replay), and the
# bin keeps no downlink counter of its own. Its tag is made under a key derived from the device
# key for this direction alone, and its type is one no uplink has, so a downlink played back to a
# gateway, or an uplink played to a bin, never verifies (reflection).
import struct
from binlink.wire import codec

T_DOWNLINK = 4
F_LISTENING = 0x80  # uplink flag: the bin listens for a downlink after this frame
DIRECTION_LABEL = b"binlink downlink key v1"
MAX_LEN = 51  # the smallest LoRa payload of the plan (EU868 SF12 at 125 kHz): every window can carry it

C_ACK = 1  # u32: bit k set = uplink (answered - k) is stored at the gateway
C_TIME = 2  # u32 unix seconds, u16 milliseconds: the gateway's clock as the frame went to its radio
C_CONFIG = 3  # u32 hash of the desired settings, u8 n, n x (u8 setting id, u32 value)
C_PACE = 4  # u16 minutes: ask for an answer at least this far apart (firmware 1.6.0 on)
C_ECHO = 5  # u8 0 .. codec.ECHO_MAX: readings not yet acknowledged each reading frame repeats (1.7.0 on)
COMMAND_NAMES = {C_ACK: "ack", C_TIME: "time", C_CONFIG: "config", C_PACE: "pace", C_ECHO: "echo"}
PACE_MIN = (10, 10080)  # 10 minutes to a week
MAX_SETTINGS = 4  # with ack and time, four settings fill MAX_LEN; more go in the next window

# settings a downlink may change: id -> (name, lowest, highest). Never renumber: ids are on air.
SETTINGS = {
    1: ("wake_s", 60, 86400),
    2: ("report_s", 300, 86400),
    3: ("report_near_full_s", 300, 86400),
    4: ("near_full_pct", 10, 100),
    5: ("change_mm", 10, 2000),
    6: ("fire_c", 40, 100),
    7: ("low_battery_mv", 2800, 3600),
    8: ("backlog_per_frame", 1, 4),
}
SETTING_IDS = dict((v[0], k) for k, v in SETTINGS.items())


def direction_key(key):
    """The key downlink tags are made under: HMAC-SHA256(device key, label), first 16 bytes."""
    return codec.hmac_sha256(key, DIRECTION_LABEL)[:16]


def setting_problems(settings):
    """What a bin would refuse in {name: value}; [] when it would apply all of it."""
    problems = []
    for name in settings:
        value = settings[name]
        if name not in SETTING_IDS:
            problems.append("%s: not a setting a downlink can change" % name)
            continue
        _, lo, hi = SETTINGS[SETTING_IDS[name]]
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            problems.append("%s: %r outside %d..%d" % (name, value, lo, hi))
    wake, report = settings.get("wake_s"), settings.get("report_s")
    if isinstance(wake, int) and isinstance(report, int) and report < wake:
        problems.append("report_s %d is shorter than wake_s %d" % (report, wake))
    return problems


def settings_hash(settings):
    """4 bytes naming a full set of settings {name: value}: SHA-256 over (id, value) pairs in id
    order. The bin reports it for what it runs; the gateway compares it with what it wants."""
    data = b""
    for i in sorted(SETTINGS):
        name = SETTINGS[i][0]
        if name in settings:
            data += struct.pack(">BI", i, settings[name])
    return codec._sha256(data)[:4]


def encode(key, device_id, answered_fcnt, ack=None, time_ms=None, config=None, pace_min=None, echo=None):
    """A downlink answering uplink answered_fcnt. ack: the u32 bitmap or None; time_ms: unix time in
    ms or None; config: (desired settings hash, {name: value} to change) or None; pace_min: the
    least minutes between the bin's regular windows (PACE_MIN) or None; echo: how many unacknowledged
    readings each of its reading frames repeats (0 .. codec.ECHO_MAX) or None."""
    codec._check_key(key)
    body = b""
    if ack is not None:
        body += struct.pack(">BI", C_ACK, ack & 0xFFFFFFFF)
    if time_ms is not None:
        body += struct.pack(">BIH", C_TIME, time_ms // 1000, time_ms % 1000)
    if config is not None:
        want_hash, settings = config
        problems = setting_problems(settings)
        if problems or not 0 < len(settings) <= MAX_SETTINGS or len(want_hash) != 4:
            raise ValueError("config refused: %s" % ("; ".join(problems) or "1 to %d settings and a 4-byte hash" % MAX_SETTINGS))
        body += struct.pack(">B", C_CONFIG) + want_hash + struct.pack(">B", len(settings))
        for name in sorted(settings, key=lambda n: SETTING_IDS[n]):
            body += struct.pack(">BI", SETTING_IDS[name], settings[name])
    if pace_min is not None:
        if not PACE_MIN[0] <= pace_min <= PACE_MIN[1]:
            raise ValueError("pace of %r minutes, not %d..%d" % (pace_min, PACE_MIN[0], PACE_MIN[1]))
        body += struct.pack(">BH", C_PACE, pace_min)
    if echo is not None:
        if not (isinstance(echo, int) and 0 <= echo <= codec.ECHO_MAX):
            raise ValueError("echo of %r, not 0..%d" % (echo, codec.ECHO_MAX))
        body += struct.pack(">BB", C_ECHO, echo)
    if not body:
        raise ValueError("a downlink carries at least one command")
    head = codec._header(T_DOWNLINK, device_id, answered_fcnt) + body
    frame = head + _tag(key, answered_fcnt, head)
    if len(frame) > MAX_LEN:
        raise ValueError("downlink of %d bytes, at most %d" % (len(frame), MAX_LEN))
    return frame


def _tag(key, answered_fcnt, head):
    return codec.hmac_sha256(direction_key(key), struct.pack(">I", answered_fcnt) + head)[:codec.TAG_LEN]


def parse(frame, key, device_id, answered_fcnt):
    """What a bin does with a frame heard in the window after its uplink answered_fcnt: returns
    {"ack": int, "time_ms": int, "config": (hash, {name: value}), "pace_min": int, "echo": int} with
    the commands present.
    Raises codec.ProtocolError (truncated, bad_version, bad_type, not_mine, bad_tag, bad_command,
    bad_length, bad_setting): nothing of a refused frame is used."""
    if len(frame) < codec.HEADER_LEN + 1 + codec.TAG_LEN or len(frame) > MAX_LEN:
        raise codec.ProtocolError("truncated" if len(frame) < codec.HEADER_LEN + 1 + codec.TAG_LEN else "bad_length",
                                  "%d bytes" % len(frame))
    if frame[0] >> 4 != codec.VERSION:
        raise codec.ProtocolError("bad_version", "version %d" % (frame[0] >> 4))
    if frame[0] & 0x0F != T_DOWNLINK:
        raise codec.ProtocolError("bad_type", "type %d" % (frame[0] & 0x0F))
    if (frame[1] << 16) | (frame[2] << 8) | frame[3] != device_id:
        raise codec.ProtocolError("not_mine", "another device's downlink")
    if (frame[4] << 8) | frame[5] != answered_fcnt & 0xFFFF or not _same(_tag(key, answered_fcnt, frame[:-4]), frame[-4:]):
        raise codec.ProtocolError("bad_tag")
    return _commands(frame, codec.HEADER_LEN, len(frame) - codec.TAG_LEN)


def _same(a, b):
    diff = 0
    for i in range(codec.TAG_LEN):  # constant time
        diff |= a[i] ^ b[i]
    return diff == 0


def _commands(frame, i, end):
    out = {}
    last = 0
    while i < end:
        c = frame[i]
        if c not in COMMAND_NAMES or c <= last:  # each once, in id order: one encoding per content
            raise codec.ProtocolError("bad_command", "command %d at byte %d" % (c, i))
        last = c
        if c == C_ACK:
            i = _need(i, 5, end, c)
            out["ack"] = struct.unpack(">I", frame[i - 4:i])[0]
        elif c == C_TIME:
            i = _need(i, 7, end, c)
            s, ms = struct.unpack(">IH", frame[i - 6:i])
            if ms > 999:
                raise codec.ProtocolError("bad_command", "time with %d ms" % ms)
            out["time_ms"] = s * 1000 + ms
        elif c == C_PACE:
            i = _need(i, 3, end, c)
            pace = (frame[i - 2] << 8) | frame[i - 1]
            if not PACE_MIN[0] <= pace <= PACE_MIN[1]:
                raise codec.ProtocolError("bad_command", "pace of %d minutes" % pace)
            out["pace_min"] = pace
        elif c == C_ECHO:
            i = _need(i, 2, end, c)
            if frame[i - 1] > codec.ECHO_MAX:
                raise codec.ProtocolError("bad_command", "echo of %d" % frame[i - 1])
            out["echo"] = frame[i - 1]
        else:
            i = _need(i, 6, end, c)
            want_hash, n = bytes(frame[i - 5:i - 1]), frame[i - 1]
            first = i
            i = _need(i, 5 * n, end, c)
            out["config"] = (want_hash, _settings(frame, first, n))
    return out


def _need(i, n, end, command):
    """The index past n more bytes of command, which must end before the tag."""
    if i + n > end:
        raise codec.ProtocolError("bad_length", "%s cut short" % COMMAND_NAMES[command])
    return i + n


def _settings(frame, i, n):
    if not 0 < n <= MAX_SETTINGS:
        raise codec.ProtocolError("bad_setting", "%d settings" % n)
    settings = {}
    last = 0
    for k in range(n):
        sid, value = struct.unpack(">BI", frame[i + 5 * k:i + 5 * k + 5])
        if sid not in SETTINGS or sid <= last:
            raise codec.ProtocolError("bad_setting", "setting %d" % sid)
        last = sid
        settings[SETTINGS[sid][0]] = value
    problems = setting_problems(settings)
    if problems:
        raise codec.ProtocolError("bad_setting", problems[0])
    return settings
