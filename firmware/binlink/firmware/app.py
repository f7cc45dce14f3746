# The wake cycle: boot → read config → measure → decide → encode → transmit → deep sleep.
# Every millisecond awake costs battery, so the cycle does only what this wake needs, and any
# failure ends in deep sleep — never a crash loop that drains the battery.
# The radio code (transports, framing, airtime) is imported only by a wake that needs the radio:
# three wakes in four only measure, and every module loaded costs boot time (docs/energy.md).
from binlink.wire import codec

from binlink.firmware import config, log, measure, sensors, state

FW_VERSION = (1, 7, 0)  # 1.1: the hello carries the full counter, sent daily too; 1.2: brown-out back-off;
# 1.3: EBYTE AUX low-then-high and fast sleep, 20 us trigger, a no-echo after near-full read as full;
# 1.4: the downlink (listen.py): acknowledged delivery, settings and time; the hello's hash names the settings;
# 1.5: Wi-Fi bins listen too, on their MQTT downlink topic, one MQTT session per wake;
# 1.6: the gateway's pace: regular windows at least that many minutes apart instead of every Nth report;
# 1.6.1: each pad set up once a wake (hw._pin), not at every read, write or ping;
# 1.6.2: ext0 set only when it changes: the tilt wake when the deep sleep begins, not again after every light sleep
# 1.7: the echo: once a gateway asks, a reading frame repeats the last readings not yet acknowledged
F_LISTENING = 0x80  # downlink.F_LISTENING, without importing it on wakes that only measure
CLOCK_STALE_S = 7 * 86400  # the RTC on the ESP32's internal oscillator drifts by minutes a day (docs/hardware.md)
DAY_S = 86400
ACK_REACH = 24  # counters: an answer judges the 32 below it; 8 are left for the listening wake's batches and hello
NEAR_FULL_MM = 100  # an echo this close above the blind zone: the bin is about to fill it
NEAR_FULL_WAKES = 96  # a no-echo reads as full for at most this many wakes in a row (a day at 15 min), then as a fault
POWER_ON, DEEPSLEEP = 1, 4  # hw.reset_cause(): codec.RESET_CAUSES
_log = log.get("app")
_stored = {}  # settings downlinks changed, as kept in NVS (start() reads them)


def run_cycle(hw, cfg, chash):
    """One wake (the watchdog already running); returns the number of seconds to deep-sleep.
    State is saved and the radio put to sleep before returning, each even if the other fails."""
    s = state.load(hw)
    radio = _Radio(hw, cfg)
    try:
        return _cycle(hw, cfg, chash, s, radio)
    except Exception as e:  # noqa: BLE001 - any fault: count it, sleep, try again next wake
        s.errors += 1
        _failed("cycle", e)
        return cfg["wake_s"]
    finally:
        try:
            state.save(hw, s)
        finally:
            radio.sleep()


class _Radio:
    """The transport, made (and its code imported) the first time this wake uses it."""

    def __init__(self, hw, cfg):
        self.hw, self.cfg, self.t = hw, cfg, None

    def get(self):
        if self.t is None:
            from binlink.firmware import transports

            self.t = transports.make(self.hw, self.cfg)
        return self.t

    def sleep(self):
        if self.t is not None:
            self.t.sleep()


def _cycle(hw, cfg, chash, s, radio):
    now = hw.time_s()
    cause = hw.reset_cause()
    if cause != DEEPSLEEP:
        radio.get()  # after any reset the module may be left awake (pins held mid-send): it is put to sleep
    if s.restored and cause == POWER_ON:
        # power came back with RTC memory intact (a real power loss clears it): the supply browned
        # out — the ESP32 reports a brown-out as a power-on — on a cell sagging under the radio's
        # pulse or the sensor's inrush. Set-up, hello and sending would brown it out again:
        # measure, keep the readings, back off.
        s.brownouts = min(255, s.brownouts + 1)
        s.quiet_until = now + _backoff_s(cfg, s.brownouts)
        _log.warning("brown-out %d in a row: no transmission for %d s", s.brownouts, s.quiet_until - now)
    quiet = now < s.quiet_until
    if not quiet and (cause != DEEPSLEEP or not s.restored):  # cold boot: check the radio module's settings, say hello
        if not radio.get().setup():
            s.errors += 1
        _hello(hw, cfg, chash, s, radio, now, cause)
    hw.wdt_feed()
    job = hw.temperature_start(cfg["temp_pin"], cfg["temp_bits"])  # converts while the sensor powers up
    samples = measure.pings(hw, sensors.make(hw, cfg), cfg)
    temp = hw.temperature_c(cfg["temp_pin"], cfg["temp_bits"], job)
    dist, valid, flags = measure.reading(samples, cfg["pings"], temp, cfg["blind_mm"], cfg["max_mm"])
    dist, flags = _blind_zone(cfg, s, dist, valid, flags)
    battery = hw.battery_mv(cfg["battery_pin"], cfg["battery_en_pin"])
    hw.wdt_feed()
    alarm = 0
    if temp is not None and temp >= cfg["fire_c"]:
        alarm |= codec.F_FIRE
    if cfg["tilt_pin"] >= 0 and hw.pin_read(cfg["tilt_pin"]) == 0:
        alarm |= codec.F_TILT
    if battery < cfg["low_battery_mv"]:
        flags |= codec.F_LOW_BATTERY
    new_alarm = alarm & ~s.alarm_flags
    flags |= alarm
    if new_alarm:
        flags |= codec.F_ALARM_WAKE
    fill = _fill_pct(cfg, dist)
    if not _due(cfg, s, now, dist, fill, new_alarm, quiet):
        return _sleep_s(cfg, s)
    if quiet:  # kept for when the cell has recovered, sent then as a backlog batch
        state.push_backlog(s, state.next_fcnt(hw, s, cfg["nvs_every"]), now,
                           codec.pack_reading(dist, temp, battery, flags, valid, cfg["pings"]))
        s.last_report, s.alarm_flags = now, alarm
        s.last_distance = state.NO_DISTANCE if dist is None else dist
        return _sleep_s(cfg, s)
    if s.last_report and now // DAY_S != s.last_report // DAY_S:
        # the first report of each day: the hello's full counter lets a gateway that never heard
        # this bin (or lost track of it) take up its counter (docs/protocol.md, Counter)
        _hello(hw, cfg, chash, s, radio, now, cause)
    listening = _wants_listen(cfg, s, now)
    _flush_backlog(hw, cfg, s, radio, now, listening)  # after a silent window: one batch a report
    if s.backlog:
        flags |= codec.F_BACKLOG
    body = codec.pack_reading(dist, temp, battery, flags, valid, cfg["pings"])
    fcnt = state.next_fcnt(hw, s, cfg["nvs_every"])
    # RTC memory is read back, not trusted: a flipped bit must not ask for more echoes than a frame holds
    echoes = _echoes(s, fcnt, now, min(codec.ECHO_MAX, (s.dl & state.DL_ECHO) >> state.DL_ECHO_SHIFT))
    frame = codec.encode_reading_body(cfg["key"], cfg["device_id"], fcnt, _flagged(body, listening), echoes)
    if not _send(hw, cfg, s, radio, frame, now):
        state.push_backlog(s, fcnt, now, body)
        state.save(hw, s)  # a reset before the end of the cycle must not lose the reading
    else:
        s.since_listen = min(255, s.since_listen + 1)
        if _can_hear(cfg):  # kept until acknowledged, resent if shown missing
            state.push_unconfirmed(s, fcnt, fcnt, now, body)
        if listening:
            from binlink.firmware import listen

            state.save(hw, s)
            if listen.run(hw, cfg, s, radio.get(), frame, fcnt, chash, _stored):
                state.save(hw, s)
                _hello(hw, cfg, chash, s, radio, now, cause)  # the settings the bin runs now, by their hash
    # reported (or queued): this is the new reference for the next decision
    s.last_report = now
    s.last_distance = state.NO_DISTANCE if dist is None else dist
    s.alarm_flags = alarm
    return _sleep_s(cfg, s)


def _flagged(body, listening):
    """The reading as sent: F_LISTENING asks for an answer (kept out of the stored body: a
    backlog batch's readings carry the bit reserved)."""
    if not listening:
        return body
    b = bytearray(body)
    b[4] |= F_LISTENING
    return bytes(b)


def _echoes(s, fcnt, now, n):
    """The n newest readings not acknowledged yet that went in frames of their own, oldest first, as
    (fcnt, age in minutes, body): repeated after this one, a collision costs one only if these
    frames collide too, and no answer has to show it missing first (docs/protocol.md, "Reading
    frame with echoes")."""
    out = []
    for e in reversed(s.unconfirmed):
        if len(out) >= n or fcnt - e[1] > 255:
            break
        if e[0] == e[1]:
            out.insert(0, (e[1], state.true_s(s, now - e[2]) // 60, e[3]))
    return out


def _can_hear(cfg):
    """False for a Wi-Fi bin with no downlink topic: no answer can reach it."""
    return cfg["transport"] != "wifi" or bool(cfg["mqtt_downlink_topic"])


def _wants_listen(cfg, s, now):
    """Once the gateway's pace has passed since the last window (before any gateway gave one: every
    listen_every-th report; before any answered at all, twice as often: a busy gateway answers the
    bins of a new fleet over hours), or before unacknowledged readings outgrow what an answer can judge;
    sooner with a clock never set, without its rate or stale, settings not yet confirmed, or (no
    pace given) a backlog; not sooner after a window that stayed silent (the link may be down)."""
    if not _can_hear(cfg):
        return False
    if s.pace_min:  # the wake jitter must not put a window off by a whole report
        if now - s.listen_at >= s.pace_min * 60 - cfg["wake_s"] // 10:
            return True
    elif s.since_listen + 1 >= (cfg["listen_every"] if s.dl & state.DL_HEARD else (cfg["listen_every"] + 1) // 2):
        return True
    u = s.unconfirmed  # an answer before readings would be taken as delivered unjudged (the list is full)
    if u and s.dl & state.DL_HEARD and (len(u) + cfg["backlog_per_frame"] >= state.UNCONFIRMED_CAP
                                        or s.fcnt - u[0][0] >= ACK_REACH):
        return True  # or the oldest would leave the ack bitmap's reach (a gateway that never answered: no use)
    if s.dl & state.DL_MISSED:
        return False
    # a backlog waits for the next window under a pace (the reach above bounds it), the clock:
    # never set, its RTC's rate not learnt yet (a second setting does), or a week old
    return bool(s.backlog and not s.pace_min or not s.dl & state.DL_RATE or now - s.clock_at > CLOCK_STALE_S
                or s.dl & state.DL_SETTINGS)


def _blind_zone(cfg, s, dist, valid, flags):
    """A JSN-SR04T inside its blind zone (~23-25 cm) loses the echo rather than reporting it: a
    no-echo right after a reading at the blind zone's edge is the bin filling it, not a fault."""
    if dist is None and valid == 0:
        if 0 < s.near_full <= NEAR_FULL_WAKES:
            s.near_full += 1
            return cfg["blind_mm"], (flags & ~codec.F_SENSOR_FAULT) | codec.F_BLIND_ZONE
        s.near_full = 0
        return dist, flags
    s.near_full = 1 if dist is not None and dist <= cfg["blind_mm"] + NEAR_FULL_MM else 0
    return dist, flags


def _hello(hw, cfg, chash, s, radio, now, cause):
    _log.info("hello device=%06x fw=%d.%d.%d reset_cause=%d fcnt=%d", cfg["device_id"], FW_VERSION[0], FW_VERSION[1],
              FW_VERSION[2], cause, s.fcnt)
    from binlink.wire import downlink

    settings = {}
    for i in downlink.SETTINGS:  # from 1.4.0 the hash names the settings the bin runs, as a gateway computes it
        settings[downlink.SETTINGS[i][0]] = cfg[downlink.SETTINGS[i][0]]
    _send(hw, cfg, s, radio, codec.encode_hello(cfg["key"], cfg["device_id"], state.next_fcnt(hw, s, cfg["nvs_every"]),
                                                FW_VERSION, cause, downlink.settings_hash(settings)), now)


def _sleep_s(cfg, s):
    """wake_s ± 5 %, varied by device and counter: bins powered up together drift apart instead
    of waking (and transmitting) in lock-step for years."""
    w = cfg["wake_s"]
    spread = w // 10
    if spread < 1:
        return w
    return w - spread // 2 + (cfg["device_id"] * 7919 + s.fcnt * 104729 + s.last_report) % spread


def _fill_pct(cfg, dist):
    if dist is None:
        return None
    span = cfg["depth_mm"] - cfg["full_mm"]
    pct = 100 * (cfg["depth_mm"] - dist) // span if span > 0 else 0
    return 0 if pct < 0 else 100 if pct > 100 else pct


def _due(cfg, s, now, dist, fill, new_alarm, quiet=False):
    # a backlog is sent at once, unless the cell is recovering (quiet) or the last window stayed
    # silent: a congested or lost link is not sent more (the backlog rides with the reports)
    if new_alarm or not s.last_report or (s.backlog and not quiet and not s.dl & state.DL_MISSED):
        return True
    interval = cfg["report_near_full_s"] if fill is not None and fill >= cfg["near_full_pct"] else cfg["report_s"]
    if now - s.last_report >= interval - cfg["wake_s"] // 10:  # the wake jitter must not skip a report
        return True
    if dist is not None and s.last_distance != state.NO_DISTANCE and abs(dist - s.last_distance) >= cfg["change_mm"]:
        return True  # filled quickly, or emptied: a pickup is reported when it happens
    if (dist is None) != (s.last_distance == state.NO_DISTANCE):
        return True  # sensor fault appeared or cleared
    return False


def _send(hw, cfg, s, radio, frame, now):
    """Sends if the duty cycle allows; books the off-time. False: not sent (caller keeps it)."""
    t = radio.get()
    if cfg["transport"] in ("e22", "e32", "rylr998"):  # transports.duty_limited, without importing it
        from binlink.wire import airtime

        dc = cfg["duty_cycle"]
        if s.budget_ms < 0:
            s.budget_ms = airtime.budget_cap_ms(dc)
        else:
            s.budget_ms = airtime.refill_ms(s.budget_ms, now - s.budget_at, dc)
        s.budget_at = now
        toa = airtime.time_on_air_ms(t.on_air_len(frame), cfg["sf"], cfg["bandwidth_khz"], preamble=t.PREAMBLE)
        if toa > s.budget_ms:
            _log.info("duty cycle: %d ms of airtime left, frame needs %d", s.budget_ms, toa)
            return False
        s.budget_ms -= int(toa + 0.999)
    sent = t.send(frame)
    if sent:
        s.brownouts = 0
    return sent


def _backoff_s(cfg, brownouts):
    """Twice the wake interval after one brown-out, doubling with each in a row, at most a day."""
    return min(DAY_S, cfg["wake_s"] << min(brownouts, 7))


def _flush_backlog(hw, cfg, s, radio, now, listening=False):
    """Oldest first, in batches; each batch gets a new counter above all of its readings. Before
    a window (or to a gateway known to answer) the readings sent stay unconfirmed until
    acknowledged, as many as an answer can judge; after a silent window, one batch a wake."""
    track = listening or s.dl & state.DL_HEARD
    batches = 0
    while s.backlog:
        if track and (len(s.unconfirmed) + cfg["backlog_per_frame"] >= state.UNCONFIRMED_CAP
                      or (batches and s.dl & state.DL_MISSED)):
            return
        batches += 1
        hw.wdt_feed()
        fcnt = state.next_fcnt(hw, s, cfg["nvs_every"])
        while s.backlog and fcnt - s.backlog[0][0] > 255:  # too far behind to encode: count, drop
            s.backlog.pop(0)
            s.dropped += 1
        chunk = s.backlog[: cfg["backlog_per_frame"]]
        if not chunk:
            return
        frame = codec.encode_backlog(cfg["key"], cfg["device_id"], fcnt,
                                     [(e[0], state.true_s(s, now - e[1]) // 60, e[2]) for e in chunk])
        if not _send(hw, cfg, s, radio, frame, now):
            return
        s.backlog = s.backlog[len(chunk):]
        if track:
            for e in chunk:
                state.push_unconfirmed(s, fcnt, e[0], e[1], e[2])
        state.save(hw, s)


def _failed(where, e):
    try:
        _log.error("%s failed: %s", where, repr(e))
    except Exception:  # noqa: BLE001 - nothing left to tell it to: sleep all the same
        pass


def main(hw):
    """Device entry point (main.py): one cycle, then deep sleep, whatever fails on the way."""
    cfg = chash = None
    try:
        cfg, chash, problems = config.load()
        for p in problems:
            _log.warning("config: %s", p)
    except Exception as e:  # noqa: BLE001 - start() sleeps safely without a config
        _failed("config", e)
    start(hw, cfg, chash)


def start(hw, cfg, chash):
    """Everything after reading the config: the watchdog first, one cycle, then deep sleep (never
    returns on a board). Any exception ends in deep sleep too, never in the REPL at ~40 mA; a
    Ctrl-C from the technician's tool is no Exception and still reaches the REPL."""
    global _stored
    sleep_s = config.SAFE_SLEEP_S
    try:
        usable = cfg is not None and config.usable(cfg)
        hw.wdt_start(cfg["wdt_ms"] if usable else config.DEFAULTS["wdt_ms"])
        if not usable:
            _log.error("no usable config: sleeping %d s", sleep_s)
        else:
            cfg = dict(cfg)  # the settings downlinks changed go over the file's
            _stored = {}
            try:
                _stored = config.stored(hw, cfg, chash)
            except Exception as e:  # noqa: BLE001 - unreadable: the config file's settings, as before 1.4
                _failed("settings", e)
            sleep_s = cfg["wake_s"]  # if anything below fails
            if cfg["tilt_pin"] >= 0 and hw.pin_read(cfg["tilt_pin"]) == 1:
                # wake when the bin tips over; not while it lies tipped, or it would wake at once forever
                hw.wake_on_pin(cfg["tilt_pin"], 0)
            sleep_s = run_cycle(hw, cfg, chash)
    except Exception as e:  # noqa: BLE001 - any fault: sleep, try again next wake
        _failed("wake", e)
    hw.deepsleep(sleep_s * 1000)
