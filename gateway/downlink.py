"""The answer path (issue 20): a bin that sets downlink.F_LISTENING in an uplink keeps its radio in
receive after it; once that uplink is committed, the gateway that stored it answers on the radio
it came in on. docs/protocol.md "Downlink" is the contract, binlink.wire.downlink the codec.

What the answer carries:
- `ack`: bit k set when frame (answered - k) is stored here: a reading frame by the counter's
  stored-readings window (heads.Counter.stored), a backlog batch or a hello by the frames of them
  this gateway committed (kept here, in memory: after a restart a bin may resend a batch's readings
  once, which the window then recognises); read after the commit, never before (the ack means "on
  disk"). A batch's bit acknowledges every entry in it (one commit), also those more than 31
  counters behind.
- `time`: the gateway's clock as the frame goes on air (now + its bytes' time on the module's
  UART), only while clock.py finds it plausible and the kernel says it is synchronised.
- `config`: when the bin's desired settings (registry_settings.desired) differ from the hash it
  reported in its last hello (or none was heard): up to four settings per answer, the registry's
  own first, then the firmware defaults the desired set includes, in turns; only the settings that
  differ when the reported hash names a set the gateway knows (the defaults, a set it wanted).

Who answers: only uplinks this gateway accepted are collected (pipeline.listening: hellos, backlog
batches, and readings with the flag); with several
gateways that is the claim's winner, the one that published it. A hello has no flags byte and is
never answered; its settings hash is recorded (a bin wanting an answer after it sets the flag in
the report that follows). Skipped, and counted (binlink_downlinks_skipped_total{reason}): over the
radio's duty-cycle budget, later than the source's answer_within_ms after the group began (150: the
bins wait 200 ms from their uplink's end to the answer on air, the modules' serial hand-overs
included), a source with no radio (Wi-Fi) or `downlink = false`, the commit refused (a full disk).

Desired vs reported is published retained on `<base>/bin/<bin>/settings` through the outbox, and
the last reported hash per bin is kept in `downlink.sqlite` beside the state file."""
import json
import logging
import os
import sqlite3
import time

from binlink.wire import airtime, codec, downlink
from binlink.gateway import integrate, logs, module_formats, registry_settings, wifi_input
from binlink.gateway.outbox import Batch, Kind, Message
from binlink.gateway.storage import StorageFull

log = logs.get("downlink")
SETTINGS_FROM = (1, 4, 0)  # firmware from which the hello's config hash is downlink.settings_hash
PACE_FROM = (1, 6, 0)  # firmware that takes the `pace` command (an older bin refuses the whole answer)
ECHO_FROM = (1, 7, 0)  # firmware that takes the `echo` command
LOSSY_PACE = 0.5  # of the pace, for a bin whose readings go missing in spite of their echoes (measured: 0.3 overloads)
PACE_SHARE = 0.5  # of a radio's airtime budget for the bins' regular windows: the rest answers resends, settings, clocks
HEARD_S = 26 * 3600  # a bin heard within this long counts towards its radio's pace (every bin says hello daily)
HEARD_SAVE_S = 3600  # how often the bins each radio heard are written down, for the pace after a restart
CLOCK_SLACK_S = 300  # a heard time read back this far ahead of the clock is still believed (a clock set back a little)


def asks(up):
    """Does this accepted uplink ask for an answer? F_LISTENING in a reading's flags (a backlog
    batch: in any entry's). Cheap: on the per-frame path."""
    for r in up.readings:
        if r.flags & downlink.F_LISTENING:
            return True
    return False


def ack_bitmap(head, stored, answered, frames=()):
    """u32: bit k set when frame answered - k is stored; head, stored: the device's counter and its
    readings' window (bit j: head - j stored) after the commit; frames: counters of other frames
    (batches, hellos) committed."""
    behind = head - answered
    bits = (stored >> behind) & 0xFFFFFFFF if 0 <= behind < 256 else 0
    for f in frames:
        if 0 <= answered - f < 32:
            bits |= 1 << (answered - f)
    return bits | 1  # the answered uplink was just committed


def reports_settings(fw_version):
    return _at_least(fw_version, SETTINGS_FROM)


def takes_pace(fw_version):
    return _at_least(fw_version, PACE_FROM)


def echoes_wanted(ack, answered_fcnt, answered):
    """Echoes to ask of a bin: two once it is `lossy`, else as many as its frame carries, at least
    one. Never fewer than it sends: an answer that asks again costs 2 bytes on air."""
    if lossy(ack, answered_fcnt):
        return codec.ECHO_MAX
    head = bytes(answered[:1])
    return max(1, (head[0] >> 4) - codec.VERSION) if head and head[0] & 0x0F == codec.T_READING else 1


def lossy(ack, answered_fcnt):
    """A frame went missing, a reading in spite of its echo: a bit of the answer's ack clear below
    its highest set one (counters before the first this gateway stored are not judged: a bin it has
    just met, or a cold boot's hello lost). Such a bin gets more echoes and a shorter pace."""
    bits = ack & ((1 << min(32, answered_fcnt + 1)) - 1)
    return bits != (1 << bits.bit_length()) - 1


def echo_command(fw_version, answered, config, want=1):
    """`want` to a bin that can echo (docs/protocol.md, "Reading frame with echoes") and answered
    with a reading frame that carries another number of echoes; None when it carries that many
    already, the bin cannot echo, or the answer is full (four settings: a later one says it)."""
    head = bytes(answered[:1])
    if not head or head[0] & 0x0F != codec.T_READING or head[0] >> 4 == codec.VERSION + want:
        return None
    if not _at_least(fw_version, ECHO_FROM):
        return None
    return None if config is not None and len(config[1]) >= downlink.MAX_SETTINGS else want


def radio_commands(radio, fw_version, ack, answered_fcnt, answered, config, echoes=None):
    """The `pace` and `echo` of an answer on `radio` (each None when left out): half the pace and two
    echoes for a lossy bin. echoes: asked for instead of echoes_wanted (0: none)."""
    pace = radio.pace_min(lossy(ack, answered_fcnt)) if takes_pace(fw_version) else None
    want = echoes_wanted(ack, answered_fcnt, answered) if echoes is None else echoes
    return pace, echo_command(fw_version, answered, config, want) if want else None


def _at_least(fw_version, version):
    try:
        return tuple(int(x) for x in fw_version.split(".")) >= version
    except (AttributeError, ValueError):
        return False


def config_chunks(device, running=None):
    """The desired settings, cut in commands of at most MAX_SETTINGS: the registry's own settings
    first (what the operator asked for), then the defaults the desired set includes. running: the
    full set the bin runs, when the gateway knows it (registry_settings.KnownSets): then only the
    settings that differ, most often one command."""
    want = registry_settings.desired(device)
    if running is not None:
        want = {n: v for n, v in want.items() if running.get(n) != v} or want  # or: two sets, one hash
    by_id = sorted(want, key=lambda n: downlink.SETTING_IDS[n])  # wake_s and report_s, checked together, side by side
    own = [n for n in by_id if n in dict(device.settings)]
    order = own + [n for n in by_id if n not in own]
    step = downlink.MAX_SETTINGS
    return [{n: want[n] for n in order[i:i + step]} for i in range(0, len(order), step)]


def config_command(device, reported_hash, turn, known=None):
    """The `config` command for a bin: (desired hash, the turn-th part of the desired settings)
    while the hash it reported differs from the desired one; None when it runs them, or when the
    registry wants nothing of it (the bin is left as it is). known: the KnownSets the reported
    hash is looked up in (and the desired set added to)."""
    if not device.settings:
        return None
    want = registry_settings.desired_hash(device)
    if reported_hash == want:
        return None
    running = None
    if known is not None:
        running = known.get(reported_hash)
        known.add(registry_settings.desired(device))
    chunks = config_chunks(device, running)
    return bytes.fromhex(want), chunks[turn % len(chunks)]


def settings_payload(device, reported):
    """The retained settings message: desired vs reported. reported: (hash hex, fw, at) or None."""
    want = registry_settings.desired_hash(device)
    hash_hex, fw, at = reported or (None, None, None)
    comparable = reported is not None and reports_settings(fw)
    return json.dumps({"bin_id": device.bin_id, "device": device.dev, "desired": registry_settings.desired(device),
                       "registry": dict(device.settings), "desired_hash": want, "reported_hash": hash_hex,
                       "reported_at": integrate.iso(at) if at is not None else None, "fw_version": fw,
                       "in_sync": (hash_hex == want) if comparable else None}, sort_keys=True)


class Reported:
    """Per device: the settings hash of its last hello and what was last published on its settings
    topic; per radio, when it last heard each bin (its pace). A small SQLite file beside the state
    file (not the outbox: one writer each, and a damaged file costs only this: it is started again)."""

    def __init__(self, path):
        self.path = path
        self.rows = {}
        try:
            self.db = self._open(path)
            found = self.db.execute("SELECT device_id, hash, fw, at, published FROM reported").fetchall()
        except (sqlite3.Error, OSError) as e:  # damaged: set aside and started again; no room: kept in memory
            logs.event(log, logging.ERROR, "reported settings file unusable: started again (bins report again in "
                       "their next hello)", path=path, error=str(e))
            try:
                os.replace(path, path + ".damaged")
                self.db = self._open(path)
            except (sqlite3.Error, OSError):
                self.db = self._open(":memory:")
            found = []
        for dev, h, fw, at, pub in found:  # read back like any input: a row no writer makes is passed over
            if (type(dev) is int and (h is None or type(h) is str and len(h) == 8) and (fw is None or type(fw) is str)
                    and (at is None or type(at) in (int, float)) and (pub is None or type(pub) is str)):
                self.rows[dev] = [(h, fw, at) if h is not None else None, pub]

    @staticmethod
    def _open(path):
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE IF NOT EXISTS reported (device_id INTEGER PRIMARY KEY, hash TEXT, fw TEXT, at REAL, "
                   "published TEXT)")
        db.execute("CREATE TABLE IF NOT EXISTS heard (source TEXT, device_id INTEGER, at REAL, PRIMARY KEY (source, device_id))")
        return db

    def heard(self, source, now):
        """The bins `source` heard within HEARD_S before now, as last saved. Read back like any
        input: a row no writer makes (a device id that is not one, a time that is not a number, or
        ahead of the clock) is passed over, and counted in the log."""
        try:
            rows = self.db.execute("SELECT device_id, at FROM heard WHERE source = ?", (source,)).fetchall()
        except sqlite3.Error as e:
            logs.event(log, logging.ERROR, "bins heard not read back: the pace starts from the bins heard from now",
                       source=source, error=str(e))
            return {}
        heard, bad = {}, 0
        for dev, at in rows:
            if type(dev) is int and 0 <= dev <= 0xFFFFFF and type(at) in (int, float) and at <= now + CLOCK_SLACK_S:
                if at > now - HEARD_S:  # (not NaN: it fails the test above)
                    heard[dev] = at
            else:
                bad += 1
        if bad:
            logs.event(log, logging.WARNING, "bins heard: rows passed over", source=source, rows=bad)
        return heard

    def save_heard(self, source, heard):
        """Replaces what `source` heard (a few thousand rows, hourly: little for an SD card)."""
        try:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM heard WHERE source = ?", (source,))
            self.db.executemany("INSERT INTO heard VALUES (?,?,?)", [(source, dev, at) for dev, at in heard.items()])
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            logs.event(log, logging.ERROR, "bins heard not saved", source=source, error=str(e))

    def get(self, dev):
        row = self.rows.get(dev)
        return row[0] if row else None

    def published(self, dev):
        row = self.rows.get(dev)
        return row[1] if row else None

    def save(self, dev, reported, published):
        self.rows[dev] = [reported, published]
        h, fw, at = reported or (None, None, None)
        self.db.execute("INSERT OR REPLACE INTO reported VALUES (?,?,?,?,?)", (dev, h, fw, at, published))

    def close(self):
        self.db.close()


class Radio:
    """One serial source's transmit side: its writer, its module format, its airtime budget, and the
    bins it answers (their pace)."""

    def __init__(self, source, clock=time.time, heard=None):
        """heard: the bins it heard before a restart (Reported.heard), so their pace holds."""
        self.writer = source
        self.cfg = source.source
        self.clock = clock
        self.budget_ms = airtime.budget_cap_ms(self.cfg.duty_cycle)
        self.at = clock()
        self.heard = dict(heard or {})  # device_id -> when it was last heard asking or saying hello here
        self._pruned = self.at  # the bins not heard within HEARD_S are forgotten hourly
        # an answer with ack, time and pace: what a bin's regular window costs this radio
        _, on_air, preamble = module_formats.transmission(self.cfg.format, downlink.encode(
            bytes(16), 0, 0, ack=0, time_ms=0, pace_min=downlink.PACE_MIN[0]))
        self.answer_ms = self.time_on_air_ms(on_air, preamble)

    def time_on_air_ms(self, payload_len, preamble):
        return airtime.time_on_air_ms(payload_len, self.cfg.sf, self.cfg.bandwidth_khz, preamble=preamble)

    def take(self, cost_ms, new=False):
        """Books cost_ms of airtime when the budget holds it (token bucket, wire.airtime). Unless the
        bin is `new` here (answered fewer than twice: no time, rate or pace yet), one answer's worth
        must be left over: a busy radio serves the bins waiting for their first answers first."""
        now = self.clock()
        self.budget_ms = airtime.refill_ms(self.budget_ms, now - self.at, self.cfg.duty_cycle)
        self.at = now
        if cost_ms + (0 if new else self.answer_ms) > self.budget_ms:
            return False
        self.budget_ms -= cost_ms
        return True

    def pace_min(self, lossy=False):
        """Minutes between a bin's regular windows for the bins this radio answers: their regular
        answers take PACE_SHARE of its duty-cycle budget (1,000 bins at 1 %, SF9: 12.6 h; 100: 76 min);
        LOSSY_PACE of that for a bin whose readings go missing in spite of their echoes (`lossy`)."""
        now = self.clock()
        if now - self._pruned >= 3600:
            self.heard = {dev: t for dev, t in self.heard.items() if now - t < HEARD_S}
            self._pruned = now
        per_hour = PACE_SHARE * self.cfg.duty_cycle * 3600000.0 / self.answer_ms
        pace = 60.0 * max(1, len(self.heard)) / per_hour * (LOSSY_PACE if lossy else 1.0)
        return max(downlink.PACE_MIN[0], min(downlink.PACE_MIN[1], int(pace + 0.999)))


class WifiReplies:
    """The Wi-Fi bins' answer path: published on the Wi-Fi input's connection (wifi_input.send_downlink).
    No airtime to book; the bins listen WIFI_TURNAROUND_MS (1 s) after their uplink's PUBACK."""

    answer_within_ms = 800  # the broker's two hops and the bin's poll interval fit in the rest

    def __init__(self, wifi):
        self.wifi = wifi

    def send(self, device_id, frame):
        return self.wifi.send_downlink(device_id, frame)


class Answerer:
    def __init__(self, cfg, metrics, sources, state_dir, clock=time.time, wifi=None):
        """wifi: the Wi-Fi input (wifi_input.WifiInput) whose bins are answered over MQTT, or None."""
        self.cfg = cfg
        self.metrics = metrics
        self.clock = clock
        self.reported = Reported(os.path.join(state_dir, "downlink.sqlite"))
        # the pipeline's clock: a simulated site's (simclock) books airtime on the time its channel lives in
        now = clock()
        self.radios = {s.source.name: Radio(s, clock, self.reported.heard(s.source.name, now))
                       for s in sources if s.source.downlink}
        self._heard_saved = now
        if wifi is not None and cfg.mqtt.downlink_topic:
            self.radios[wifi_input.SOURCE] = WifiReplies(wifi)
        self._turn = {}  # device_id -> next config chunk
        self._answered = {}  # device_id -> answers written (in memory: after a restart a bin is new again for two)
        self._known = registry_settings.KnownSets()  # the full sets bins may report: a change sends what differs
        self._frames = {}  # device_id -> counters of its batches and hellos committed, the last 32 counters'
        self._log_limit = logs.RateLimit(per_minute=10)

    def close(self):
        self._save_heard()
        self.reported.close()

    def _save_heard(self):
        for name, radio in self.radios.items():
            if isinstance(radio, Radio):
                self.reported.save_heard(name, radio.heard)
        self._heard_saved = self.clock()

    def after_commit(self, pipeline):
        """Answers what pipeline.process just committed and records the hellos' reports. Never raises
        for a radio or storage problem (counted and logged)."""
        ups = pipeline.listening
        if not ups:
            return
        pipeline.listening = []
        if pipeline.storage.full:  # the group was refused: nothing of it is stored, nothing is acknowledged
            self.metrics.downlinks_skipped.labels("not_stored").inc(sum(1 for u in ups if asks(u)))
            return
        changed = {}
        for up in ups:  # first every frame of the group: an answer names those before it
            radio = self.radios.get(up.source)
            if isinstance(radio, Radio):
                radio.heard[up.device.device_id] = radio.clock()
            if up.frame_type != codec.T_READING:
                dev = up.device.device_id
                self._frames[dev] = [f for f in self._frames.get(dev, ()) if up.fcnt - f < 32] + [up.fcnt]
        if self.clock() - self._heard_saved >= HEARD_SAVE_S:
            self._save_heard()
        for up in ups:
            if up.hello is not None:
                fw, _, hash_hex = up.hello
                self.reported.rows.setdefault(up.device.device_id, [None, None])[0] = (hash_hex, fw, up.received_at)
                changed[up.device.device_id] = up.device
            elif asks(up):
                self._answer(pipeline, up)
        if changed:
            self.publish_settings(pipeline.outbox, changed.values())

    def _answer(self, pipeline, up):
        radio = self.radios.get(up.source)
        if radio is None:
            self.metrics.downlinks_skipped.labels("no_radio").inc()
            return
        wifi = isinstance(radio, WifiReplies)
        within_ms = radio.answer_within_ms if wifi else radio.cfg.answer_within_ms
        if pipeline.clock() - up.received_at > within_ms / 1000:  # the bin's window is closing
            self.metrics.downlinks_skipped.labels("late").inc()
            return
        device = up.device
        dev = device.device_id
        ack = ack_bitmap(pipeline.counters[dev], pipeline.stored.get(dev, 0), up.fcnt, self._frames.get(dev, ()))
        reported = self.reported.get(dev)
        config = self._config(device, reported)
        time_ms = int(self.clock() * 1000) if pipeline.time_synced else None  # the pipeline's clock (simclock: not synced)
        fw = reported[1] if reported else None
        pace, echo = (None, None) if wifi else radio_commands(radio, fw, ack, up.fcnt, up.frame, config)
        try:
            frame = downlink.encode(device.key, dev, up.fcnt, ack=ack, time_ms=time_ms, config=config, pace_min=pace,
                                    echo=echo)
            if not wifi:
                data, on_air, preamble = module_formats.transmission(radio.cfg.format, frame, up.reception.addr)
            if time_ms is not None and not wifi:  # the instant it goes on air: after its bytes crossed to the module (8N1)
                time_ms += len(data) * 10 * 1000 // radio.cfg.baud
                frame = downlink.encode(device.key, dev, up.fcnt, ack=ack, time_ms=time_ms, config=config, pace_min=pace,
                                        echo=echo)
                data, on_air, preamble = module_formats.transmission(radio.cfg.format, frame, up.reception.addr)
        except ValueError as e:  # a registry entry the bin would refuse never gets here (registry_settings)
            self.metrics.downlinks_skipped.labels("too_long").inc()
            logs.event(log, logging.ERROR, "downlink not built", bin=device.bin_id, device=device.dev, error=str(e))
            return
        if wifi:
            self._sent(up, radio.send(dev, frame), ack, time_ms, config)
            return
        if not radio.take(radio.time_on_air_ms(on_air, preamble), self._answered.get(dev, 0) < 2):
            self.metrics.downlinks_skipped.labels("duty_cycle").inc()
            if self._log_limit.allow("duty", pipeline.clock()):
                logs.event(log, logging.WARNING, "downlink skipped: the radio's duty-cycle budget is spent",
                           source=up.source, bin=device.bin_id)
            return
        self._sent(up, radio.writer.send(data), ack, time_ms, config)

    def _sent(self, up, ok, ack, time_ms, config):
        """Counts an answer written (ok) or not; a configuration sent moves on to its next part."""
        device = up.device
        dev = device.device_id
        if not ok:
            self.metrics.downlink_write_errors.inc()
            return
        self._answered[dev] = self._answered.get(dev, 0) + 1
        self.metrics.downlinks_sent.labels("ack").inc()
        if time_ms is not None:
            self.metrics.downlinks_sent.labels("time").inc()
        if config is not None:
            self.metrics.downlinks_sent.labels("config").inc()
            self._turn[dev] = self._turn.get(dev, 0) + 1
        logs.event(log, logging.DEBUG, "downlink sent", bin=device.bin_id, device=device.dev, fcnt=up.fcnt,
                   ack="%08x" % ack, time=time_ms is not None, config=sorted(config[1]) if config else None,
                   source=up.source)

    def _config(self, device, reported):
        """reported: the device's Reported.get (its last hello's hash, firmware and time) or None."""
        return config_command(device, reported and reported[0], self._turn.get(device.device_id, 0), self._known)

    def publish_settings(self, box, devices):
        """Commits the retained settings message of each device whose message changed; the record
        of what was published moves only after the commit."""
        batch, done = Batch(), []
        now = self.clock()
        for device in devices:
            dev = device.device_id
            reported = self.reported.get(dev)
            if not device.settings and self.reported.published(dev) is None and (
                    reported is None or not reports_settings(reported[1])):
                continue  # nothing wanted, nothing comparable heard: no message
            payload = settings_payload(device, reported)
            if payload == self.reported.published(dev):
                continue
            topic = integrate.settings_topic(self.cfg.base_topic, device.bin_id)
            mid = "settings:%s:%s:%s:%d" % (device.message_prefix, registry_settings.desired_hash(device),
                                            reported[0] if reported else "-", int(now * 1000))
            batch.states[topic] = Message(mid, topic, payload, True, now, Kind.NOTICE)
            done.append((dev, reported, payload))
        if not done:
            return 0
        try:
            self.metrics.outbox_depth.inc(box.commit(batch))
            for dev, reported, payload in done:
                self.reported.save(dev, reported, payload)
        except (StorageFull, sqlite3.Error, OSError) as e:  # tried again at the next hello or start
            if self._log_limit.allow("settings", self.clock()):
                logs.event(log, logging.ERROR, "settings messages not stored", error=str(e))
            return 0
        return len(done)

