# State across deep sleep (RTC memory, at most 2048 bytes on ESP32) and power loss (NVS).
#
# RTC layout, little-endian:
#   0  magic "BL" | 2 layout version | 3 reserved
#   4  fcnt u32 | 8 errors u16 | 10 dropped u16 | 12 last report time u32 | 16 last distance u16
#   18 near-full streak u8 | 19 backlog count u8 | 20 airtime budget updated at u32 (s)
#   24 airtime budget ms u16 | 26 last alarm flags u8 | 27 brown-outs in a row u8
#   28 no transmission before u32 (s)
# (18 and 27..31 were reserved, always zero, in layout 1's first firmware: it reads the same)
# layout 2 (firmware 1.4, the downlink) adds:
#   32 clock offset ms i64 (wall clock = RTC + offset) | 40 clock set at u32 (RTC s; 0: never)
#   44 reports since the last listen u8 | 45 downlink flags u8 (DL_*) | 46 unconfirmed count u8
#   47 backlog: entries of 14 bytes: fcnt u32, measured at u32 (RTC s), reading body (6 bytes);
#      then the unconfirmed readings (sent, not yet acknowledged), 18 bytes: the counter of the
#      frame that carried it u32 (its own, or its backlog batch's), then an entry as above
# layout 3 (firmware 1.5) puts after 46: 47 clock rate i32 (ppm the RTC runs fast) | 51 RTC ms
#   (mod 2^32) the clock was last set at; the backlog then starts at 55
# layout 4 (firmware 1.6) puts after 54: 55 RTC s of the last window u32 | 59 the gateway's pace u16
#   (minutes between regular windows; 0: none heard); the backlog then starts at 61
# Layout 1 memory (firmware 1.3) is not trusted: the counter comes from NVS (a re-flash resets the chip anyway).
# The counter is also reserved ahead in NVS every N frames; after a power loss it resumes from
# the reservation, so no value is ever sent twice.
import struct

MAGIC = b"BL"
LAYOUT = 4
HEADER = "<2sBxIHHIHBBIHBBI"
HEADER_V1_LEN = 32
EXT = "<qIBBBiIIH"
HEADER_LEN = 61
ENTRY = "<II6s"
ENTRY_LEN = 14
SENT = "<III6s"
SENT_LEN = 18
RTC_BYTES = 2048
BACKLOG_CAP = 100  # the oldest is dropped (and counted) beyond
UNCONFIRMED_CAP = 24  # 61 + 100 * 14 + 24 * 18 = 1893 bytes of RTC memory
NO_DISTANCE = 0xFFFF
DL_HEARD = 1  # a gateway has answered this bin: unacknowledged readings are worth resending
DL_MISSED = 2  # the last window stayed silent: the link may be down (no extra listening, one batch per wake)
DL_SETTINGS = 4  # settings changed by a downlink, not yet seen confirmed by the gateway
DL_RATE = 8  # the RTC's rate has been measured (clock_ppm: 0 is a rate too)
DL_ECHO = 48  # two bits: how many unacknowledged readings each reading frame repeats (the gateway asked)
DL_ECHO_SHIFT = 4


class State:
    def __init__(self):
        self.fcnt = 0
        self.errors = 0
        self.dropped = 0
        self.last_report = 0
        self.last_distance = NO_DISTANCE
        self.budget_at = 0  # duty cycle: airtime budget (token bucket), as of budget_at
        self.budget_ms = -1  # -1: never transmitted; starts full
        self.alarm_flags = 0
        self.brownouts = 0  # brown-outs in a row (power-on resets with RTC memory intact)
        self.quiet_until = 0  # no transmission before this time (s): the cell recovers meanwhile
        self.near_full = 0  # 1: the last wake's echo was at the blind zone's edge; n > 1: n - 1 wakes read full since
        self.backlog = []  # [fcnt, measured_at_s, body bytes]
        self.clock_ms = 0  # wall clock minus RTC clock, ms (set by a downlink's time)
        self.clock_at = 0  # RTC time (s) the clock was set at; 0: never
        self.clock_ppm = 0  # how fast the RTC runs (parts per million), learnt from two settings of the clock
        self.clock_set_ms = 0  # RTC ms (mod 2^32) of the last setting: the rate applies from there
        self.since_listen = 255  # reports since the bin last listened (255: never: the first report listens)
        self.listen_at = 0  # RTC time (s) of the last window
        self.pace_min = 0  # the gateway's least minutes between regular windows (0: none heard: listen_every)
        self.dl = 0  # DL_* flags
        self.unconfirmed = []  # readings sent, not acknowledged yet: [frame fcnt, fcnt, measured_at_s, body]
        self.restored = False  # True when RTC memory held a valid state

    def pack(self):
        head = struct.pack(HEADER, MAGIC, LAYOUT, self.fcnt, self.errors & 0xFFFF, self.dropped & 0xFFFF,
                           self.last_report, self.last_distance, self.near_full, len(self.backlog),
                           self.budget_at, max(0, self.budget_ms), self.alarm_flags, self.brownouts, self.quiet_until)
        parts = [head, struct.pack(EXT, self.clock_ms, self.clock_at, min(255, self.since_listen), self.dl,
                                   len(self.unconfirmed), self.clock_ppm, self.clock_set_ms, self.listen_at,
                                   self.pace_min)]
        for e in self.backlog:
            parts.append(struct.pack(ENTRY, e[0], e[1], e[2]))
        for e in self.unconfirmed:
            parts.append(struct.pack(SENT, e[0], e[1], e[2], e[3]))
        out = b"".join(parts)
        assert len(out) <= RTC_BYTES
        return out


def unpack(data):
    s = State()
    if len(data) < HEADER_LEN or data[:2] != MAGIC or data[2] != LAYOUT:
        return s
    (_, _, s.fcnt, s.errors, s.dropped, s.last_report, s.last_distance, s.near_full, n,
     s.budget_at, s.budget_ms, s.alarm_flags, s.brownouts, s.quiet_until) = struct.unpack(HEADER, data[:HEADER_V1_LEN])
    (s.clock_ms, s.clock_at, s.since_listen, s.dl, u, s.clock_ppm, s.clock_set_ms, s.listen_at,
     s.pace_min) = struct.unpack(EXT, data[HEADER_V1_LEN:HEADER_LEN])
    at = HEADER_LEN
    if at + n * ENTRY_LEN + u * SENT_LEN > len(data):
        return State()  # corrupt: start clean (the counter comes from NVS)
    for i in range(n):
        fcnt, t, body = struct.unpack_from(ENTRY, data, at + i * ENTRY_LEN)
        s.backlog.append([fcnt, t, bytes(body)])
    at += n * ENTRY_LEN
    for i in range(u):
        frame, fcnt, t, body = struct.unpack_from(SENT, data, at + i * SENT_LEN)
        s.unconfirmed.append([frame, fcnt, t, bytes(body)])
    s.restored = True
    return s


def load(hw):
    s = unpack(hw.rtc_read())
    if not s.restored:
        reserved = hw.nvs_get("fcnt")
        if reserved is not None:
            s.fcnt = reserved & 0xFFFFFFFF  # skip-ahead: values below were possibly used
    return s


def since_set_ms(s, rtc_ms):
    """RTC ms since the clock was last set (valid for 49 days: the clock is set weekly)."""
    return (rtc_ms - s.clock_set_ms) & 0xFFFFFFFF


def wall_ms(s, rtc_ms):
    """The bin's wall clock: the RTC plus the offset the last downlink set, less the RTC's own
    rate (ESP32: its 150 kHz RC runs ~1 % fast in deep sleep) since then."""
    return rtc_ms + s.clock_ms - since_set_ms(s, rtc_ms) * s.clock_ppm // 1000000


def true_s(s, rtc_s):
    """An RTC interval (s) in true seconds, by the learnt rate: a backlogged reading's age."""
    return rtc_s - rtc_s * s.clock_ppm // 1000000


def save(hw, s):
    hw.rtc_write(s.pack())


def next_fcnt(hw, s, nvs_every):
    """Takes the next frame counter. Before the counter can go on air it is durable: a block
    reserved in NVS (power loss, flash wear: one write per nvs_every frames) and the state in
    RTC memory (watchdog and brown-out resets keep RTC memory; saving only at the end of the
    cycle would restore an older counter and send it again)."""
    f = s.fcnt
    s.fcnt = f + 1
    if f % nvs_every == 0:
        hw.nvs_set("fcnt", f + nvs_every)
    save(hw, s)
    return f


def push_unconfirmed(s, frame_fcnt, fcnt, at_s, body):
    """A reading sent in frame frame_fcnt, kept until a downlink acknowledges that frame (or shows
    it missing: back to the backlog). Beyond UNCONFIRMED_CAP the oldest goes back to the backlog
    (an answer could no longer judge it), or, for a bin no gateway has answered yet, is taken as
    delivered: a gateway that never answers (a receive-only radio) must not have every reading twice."""
    s.unconfirmed.append([frame_fcnt, fcnt, at_s, body])
    while len(s.unconfirmed) > UNCONFIRMED_CAP:
        e = s.unconfirmed.pop(0)
        if s.dl & DL_HEARD:
            push_backlog(s, e[1], e[2], e[3])


def push_backlog(s, fcnt, now_s, body):
    """Kept in counter order, whatever order readings come back in (an unacknowledged one is older
    than the backlog's newest): beyond BACKLOG_CAP the oldest is dropped, and counted."""
    i = len(s.backlog)
    while i and s.backlog[i - 1][0] > fcnt:
        i -= 1
    s.backlog.insert(i, [fcnt, now_s, body])
    while len(s.backlog) > BACKLOG_CAP:
        s.backlog.pop(0)
        s.dropped += 1
