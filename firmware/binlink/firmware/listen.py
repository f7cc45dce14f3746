# The receive window after an uplink (docs/protocol.md, "Downlink"), imported only by a wake that
# listens. The bin keeps its radio receiving for a bounded time after the frame it flagged
# F_LISTENING, takes the first frame that verifies as the answer to that frame, and applies it:
# acknowledged readings leave it, the clock is set, settings are validated, applied and kept.
# Anything refused changes nothing; every path returns, and the wake ends in deep sleep.
from binlink.wire import airtime, codec, downlink

from binlink.firmware import config, log, state

_log = log.get("listen")

# Gateway turnaround budget: from the end of the bin's uplink on air to the start of the answer
# on air. It covers the gateway module handing the uplink to the Pi (a 21-byte reading at 9600
# baud: 22 ms), the gateway's work (deframe, verify, store, decide: a few ms on a Pi), the
# downlink written to its module (a 56-byte framed downlink at 9600 baud: 58 ms, then 3 byte-times
# of idle before the module keys up) and scheduling slack. A gateway that answers later is not heard.
TURNAROUND_MS = 200
# A Wi-Fi bin's answer crosses the broker twice and waits for the gateway's commit (an fsync on
# an SD card: tens of ms, more when the card is busy); the bin reads it the moment it arrives, so
# the window's length costs only when no answer comes.
WIFI_TURNAROUND_MS = 1000
MARGIN_MS = 20  # the bin's UART polling and interpreter time
SETTINGS = [downlink.SETTINGS[i][0] for i in sorted(downlink.SETTINGS)]


def window_ms(cfg, t, uplink):
    """How long the bin listens after send(uplink) returned: the rest of the uplink on air (an
    EBYTE's AUX and the RYLR998's +OK come as the packet starts), the gateway's turnaround, a
    longest downlink on air, and the module handing it over on the UART."""
    longest = t.on_air_len(bytes(downlink.MAX_LEN))
    radio = cfg["transport"] in ("e22", "e32", "rylr998")
    ms = (TURNAROUND_MS if radio else WIFI_TURNAROUND_MS) + MARGIN_MS + t.out_ms(longest)
    if radio:
        pre = t.PREAMBLE
        ms += airtime.time_on_air_ms(t.on_air_len(uplink), cfg["sf"], cfg["bandwidth_khz"], preamble=pre)
        ms += airtime.time_on_air_ms(longest, cfg["sf"], cfg["bandwidth_khz"], preamble=pre)
    return int(ms + 0.999)


def run(hw, cfg, s, t, uplink, fcnt, chash, stored):
    """Listens after uplink `fcnt` (just sent); applies what a valid answer carries. Returns the
    settings changed ({} when none): the caller says hello with their hash."""
    s.since_listen = 0
    s.listen_at = hw.time_s()
    hw.wdt_feed()
    now = hw.ticks_ms()
    until = now + window_ms(cfg, t, uplink)
    if cfg["transport"] == "rylr998":  # no answer before the uplink and a shortest downlink are through
        shortest = t.on_air_len(bytes(codec.HEADER_LEN + 5 + codec.TAG_LEN))
        t.earliest = now + int(airtime.time_on_air_ms(t.on_air_len(uplink), cfg["sf"], cfg["bandwidth_khz"], preamble=t.PREAMBLE)
                               + airtime.time_on_air_ms(shortest, cfg["sf"], cfg["bandwidth_khz"], preamble=t.PREAMBLE))
    got = None
    refused = False
    for frame in t.receive(until):
        at_ms = hw.time_ms()
        try:
            got = downlink.parse(frame, cfg["key"], cfg["device_id"], fcnt)
            break
        except codec.ProtocolError as e:  # another bin's, forged, replayed, reflected: nothing used
            _log.warning("downlink refused: %s", e.reason)
            # a setting out of range is checked after the tag: the gateway's own, refused whole;
            # the hello that follows names the settings the bin still runs
            refused = refused or e.reason == "bad_setting"
        except (ValueError, IndexError) as e:  # noqa: B014 - malformed beyond the codec's checks: refused too
            _log.warning("downlink refused: %s", repr(e))
    if got is None and refused:
        return {"refused": 1}
    if got is None:
        _log.info("no downlink for %d", fcnt)
        _silent(s, fcnt)
        return {}
    s.dl = (s.dl | state.DL_HEARD) & ~state.DL_MISSED
    if "ack" in got:
        _ack(s, fcnt, got["ack"])
    else:
        s.unconfirmed = []  # answered but not acknowledged: the gateway asks for nothing again
    if "pace_min" in got:  # the gateway's share of its airtime for this bin's windows
        s.pace_min = got["pace_min"]
    if "echo" in got:  # a gateway that reads echoes asks for them (docs/protocol.md, "Reading frame with echoes")
        s.dl = s.dl & ~state.DL_ECHO | got["echo"] << state.DL_ECHO_SHIFT
    if "time_ms" in got:
        _set_clock(hw, cfg, s, t, frame, got["time_ms"], at_ms)
    if "config" in got:
        return _configure(hw, cfg, s, got["config"], chash, stored)
    s.dl &= ~state.DL_SETTINGS  # answered with no settings to change: the gateway has what it wants
    return {}


def _silent(s, fcnt):
    """No answer to uplink fcnt: most often that uplink collided, else the answer did or a busy
    gateway skipped it (its duty cycle). What fcnt carried is sent again; the readings of earlier
    uplinks wait for the next answer (its 32 counters still reach them). A second silent window in
    a row means the link may be down: they all go back to the backlog. A bin that never heard a
    gateway keeps them for its first answer to judge (to a gateway that never answers they are
    taken as delivered as they leave the full list: state.push_unconfirmed)."""
    heard = s.dl & state.DL_HEARD
    again = s.dl & state.DL_MISSED
    keep = []
    for e in s.unconfirmed:
        if heard and (again or e[0] == fcnt):
            state.push_backlog(s, e[1], e[2], e[3])
        else:
            keep.append(e)
    s.unconfirmed = keep
    s.backlog.sort(key=lambda e: e[0])  # oldest first: a batch's counter must stay within 255 of each
    s.dl |= state.DL_MISSED


def _ack(s, fcnt, bits):
    """Readings whose frame the gateway stored leave the bin; the others go back to the backlog."""
    keep = []
    for e in s.unconfirmed:
        k = fcnt - e[0]
        if not (0 <= k < 32 and (bits >> k) & 1):
            keep.append([e[1], e[2], e[3]])
    s.unconfirmed = []
    if keep:
        _log.info("%d readings not acknowledged: resent", len(keep))
        s.backlog = keep + s.backlog
        s.backlog.sort(key=lambda e: e[0])
        while len(s.backlog) > state.BACKLOG_CAP:
            s.backlog.pop(0)
            s.dropped += 1


RATE_AFTER_MS = 1200000  # 20 minutes at least between two settings: the rate is not one setting's error
RATE_BEFORE_MS = 40 * 86400000  # the RTC ms difference wraps after 49 days
RATE_MAX_PPM = 50000  # 5 %: beyond, not the RC oscillator's error but a wrong setting


def _set_clock(hw, cfg, s, t, frame, gw_ms, at_ms):
    """The gateway stamped the frame as it went to its radio; it reached the bin one time on air
    and one UART hand-over later (RTC time kept as is: backlogged ages stay differences of it)."""
    delay = t.out_ms(t.on_air_len(frame))
    if cfg["transport"] in ("e22", "e32", "rylr998"):
        delay += airtime.time_on_air_ms(t.on_air_len(frame), cfg["sf"], cfg["bandwidth_khz"], preamble=t.PREAMBLE)
    wall = gw_ms + int(delay)
    since = state.since_set_ms(s, at_ms)
    if s.clock_at and since < RATE_AFTER_MS and not s.dl & state.DL_RATE:
        return  # too soon after the first setting to learn the rate from: that one stays the reference
    if s.clock_at and RATE_AFTER_MS <= since < RATE_BEFORE_MS:
        # what the clock gained since its last setting, per RTC ms, corrects the RTC's rate: the
        # first measurement as it is, later ones a quarter each (one sleep's jitter is ~0.035 %)
        off = state.wall_ms(s, at_ms) - wall
        step = off * 1000000 // since
        s.clock_ppm = max(-RATE_MAX_PPM, min(RATE_MAX_PPM, s.clock_ppm + (step // 4 if s.dl & state.DL_RATE else step)))
        s.dl |= state.DL_RATE
    s.clock_ms = wall - at_ms
    s.clock_set_ms = at_ms & 0xFFFFFFFF
    s.clock_at = hw.time_s()
    _log.info("clock set: %d ms off, RTC %d ppm", s.clock_ms, s.clock_ppm)


def _configure(hw, cfg, s, want, chash, stored):
    """Validates the settings against the whole set they join, applies and keeps them; a refusal
    keeps the old settings (and the next hello's hash tells the gateway)."""
    want_hash, change = want
    merged = {}
    for name in SETTINGS:
        merged[name] = cfg[name]
    for name in change:
        merged[name] = change[name]
    problems = downlink.setting_problems(merged)
    if problems:
        _log.warning("settings refused: %s", problems[0])
        s.dl |= state.DL_SETTINGS  # the hello says which settings the bin runs
        return {"refused": 1}
    if downlink.settings_hash(merged) != want_hash:
        # expected while a change comes in parts (four settings an answer): the rest follows
        _log.info("settings applied; the gateway's set (%s) has more to come", want_hash)
    changed = {}
    for name in change:
        if cfg[name] != change[name]:
            changed[name] = change[name]
            cfg[name] = change[name]
    if changed:
        keep = dict(stored)
        keep.update(changed)
        config.store(hw, chash, keep)
        _log.info("settings changed: %s", changed)
    s.dl |= state.DL_SETTINGS
    return changed or {"same": 1}
