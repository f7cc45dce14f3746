"""The uplink path, one named stage after another (as ChirpStack does):

  read (serial_input) → deframe (module_formats) → parse → verify tag → counter check →
  dedup → decode → calibrate (calibration) → events → integrate → outbox (one group commit)

With several gateways the counter check and dedup also ask the shared state (Redis): the fleet's
counter when the local one does not verify a frame, and a claim that makes one gateway the
publisher of each frame (gateway/shared_state.py).

Every rejection is counted under its reason code and logged; nothing here raises on bad input."""
import logging
import os
import time
from collections import deque

from binlink.wire import codec
from binlink.gateway import calibration, events, forecast, integrate, logs
from binlink.gateway.clock import ClockCheck
from binlink.gateway.dedup import Dedup, digest
from binlink.gateway.heads import BinState, Counter
from binlink.gateway.outbox import Batch, Kind, Message
from binlink.gateway.storage import StorageFull, StorageGuard

log = logs.get("pipeline")
NOTICE_EVERY_S = 10
NOTICE_MAX = 256  # distinct (device, reason) notices per NOTICE_EVERY_S
HELD_PER_DEVICE = 64  # frames kept per bin until its next hello: a day of reports at the shortest interval
HELD_MAX_AGE_S = 2 * 86400  # the hello comes daily; older frames are not waited for
STANDBY_S = 3.0  # a peer's pending claim older than this: the peer died before its commit
SEARCH_EVERY_S = 60.0  # a counter search costs up to 65 536 HMACs (~0.3 s): at most this often per bin
SEARCH_GAP_S = 5.0  # ... and this often across all bins: forged frames naming many bins cannot eat the CPU


def clock_synced():
    """True when systemd-timesyncd (or chrony with its flag) says the clock is synchronised."""
    return os.path.exists("/run/systemd/timesync/synchronized")


class Pipeline:
    def __init__(self, cfg, devices, outbox, metrics, clock=time.time, shared=None):
        self.cfg = cfg
        self.outbox = outbox
        self.metrics = metrics
        self.clock = clock
        self.shared = shared  # SharedState or None (one gateway alone)
        self.dedup = Dedup(cfg.dedup_window_s)
        self.bins = {}  # bin_id -> BinState
        self.held = {}  # device_id -> deque of (frame, source, rec, received at): not verifiable until a resync
        self._searched = {}  # device_id -> when its counter was last searched for (None: any bin)
        self.standby = {}  # (device_id, epoch, fcnt) -> (device, frame, source, rec, heard at): a peer's pending claim
        self._claims = []  # (device, fcnt, digest hex) claimed in this group, confirmed after the commit
        self._to_claim = []  # verified frames of this group, claimed together in one round trip
        self._tails = {}  # (bin_id, source) -> the end of its readings' records
        self._bin_topics = {}  # bin_id -> (event topic, state topic)
        self.set_devices(devices)
        # derived data beside the outbox, saved every few minutes: a crash costs the last minutes' learning
        self.forecasts = forecast.ForecastStore(os.path.join(os.path.dirname(os.path.abspath(outbox.path)), "forecast.sqlite"),
                                                cfg.events.emptied_drop_pct)
        self.firmware = self.forecasts.firmware()  # device hex -> version from its last hello
        self.on_new_firmware = None  # called when a hello brings a version not seen before
        self._rx_base = {"gateway": cfg.gateway_id, "time_synced": False}
        self._log_limit = logs.RateLimit(per_minute=20)
        self._noticed = {}  # (device id, reason) -> when last published on .../rejected
        self.storage = StorageGuard(metrics, outbox.path)
        self.clock_check = ClockCheck(metrics)

    def close(self):
        self.forecasts.close()

    def set_devices(self, devices):
        """Uses this registry from now on. A device whose key changed (re-provisioned: its counter
        starts again at 0) gets a fresh counter; keeping the old one would call every frame a replay."""
        self.devices = devices
        self.counters = {}
        epochs = {d.bin_id: d.key_epoch for d in devices.values()}
        for bin_id, state in self.outbox.bins().items():  # a migrated state's epoch is its device's now
            self.bins.setdefault(bin_id, state if state.key_epoch is not None or bin_id not in epochs
                                 else state._replace(key_epoch=epochs[bin_id]))
        for dev_id, counter in self.outbox.counters().items():
            device = devices.get(dev_id)
            if device is None:
                continue
            if device.key_id == counter.key_id:
                self.counters[dev_id] = counter.fcnt
            else:
                prev = self.bins.get(device.bin_id)
                if prev is not None and prev.key_epoch == device.key_epoch:  # a new key under the same epoch
                    self.bins[device.bin_id] = prev._replace(fcnt=-1)  # counters restart: its readings are all newer
                logs.event(log, logging.WARNING, "new key for device: its frame counter starts again",
                           device=device.dev, bin=device.bin_id, last_fcnt=counter.fcnt)

    def process(self, items):
        """items: iterable of (source name, Reception). Commits once; returns readings committed."""
        now = self.clock()
        # per group, not once at start: a Pi without an RTC boots unsynchronised and syncs later
        self._rx_base["time_synced"] = self.clock_check.plausible(now) and clock_synced()
        batch = Batch()
        readings = self._take_over(now, batch) if self.standby else 0
        read = {}
        for source, rec in items:
            read[source] = read.get(source, 0) + 1
            try:
                readings += self._one(source, rec, now, batch)
            except codec.ProtocolError as e:
                self._reject(e.reason, source, e.detail)
                self._tell_installers(e.reason, source, rec, now, batch)
        if self._to_claim:
            readings += self._claim_group(batch)
        for source, n in read.items():
            self.metrics.frames_read.labels(source).inc(n)
        if batch:
            try:
                self.metrics.outbox_depth.inc(self.outbox.commit(batch))
            except StorageFull as e:
                self._refuse(batch, e)
                self._claims = []  # never confirmed: peers sharing state take these frames over
                return 0
            self.storage.ok()
            # counted once on disk: a crash before the commit must not show as accepted
            self.metrics.accepted.inc(batch.accepted)
            self.metrics.readings.inc(readings)
            if not self.forecasts.save() and self._log_limit.allow("forecast", now):
                logs.event(log, logging.WARNING, "forecasts not saved (disk full?): kept in memory, saved later")
        if self._claims:
            self.shared.confirm(self._claims)
            self._claims = []
        return readings

    def _refuse(self, batch, error):
        """Disk full: the batch's frames are refused (reason storage_full) and the counters and bin
        states in memory go back to what is on disk, so a copy heard later is not called a replay."""
        self.storage.refuse(error, batch.accepted)
        self.bins = {}
        self.set_devices(self.devices)

    def _reject(self, reason, source, detail=""):
        self.metrics.rejected.labels(reason).inc()
        if self._log_limit.allow(reason, self.clock()):
            logs.event(log, logging.WARNING, "frame rejected", reason=reason, source=source, detail=detail)

    def _tell_installers(self, reason, source, rec, now, batch):
        """A frame whose header names a device but that was refused (unknown device, bad tag,
        replay, counter gap): published so a technician at a new bin sees why, once per device and
        reason every NOTICE_EVERY_S (noise without a header is only counted)."""
        if rec.frame is None or len(rec.frame) < codec.HEADER_LEN:
            return
        try:
            _, device_id, _ = codec.parse_header(rec.frame)
        except codec.ProtocolError:
            return
        key = (device_id, reason)
        if now - self._noticed.get(key, -NOTICE_EVERY_S) < NOTICE_EVERY_S:
            return
        if len(self._noticed) >= NOTICE_MAX:  # forged headers with ever new ids must not flood MQTT
            self._noticed = {k: t for k, t in self._noticed.items() if now - t < NOTICE_EVERY_S}
            if len(self._noticed) >= NOTICE_MAX:
                return
        self._noticed[key] = now
        batch.messages.append(Message(*integrate.rejection_message(self.cfg.base_topic, self.cfg.gateway_id, device_id,
                                                                   reason, source, rec.rssi, now), now))

    def _one(self, source, rec, now, batch):
        # deframe: the module format already split the stream; its rejections arrive here
        if rec.frame is None:
            if rec.reason == "status":
                self.metrics.module_status.inc()
                return 0
            raise codec.ProtocolError(rec.reason, rec.detail)
        frame = rec.frame
        # parse
        header = codec.parse_header(frame)
        device_id = header[1]
        device = self.devices.get(device_id)
        if device is None:
            raise codec.ProtocolError("unknown_device", "device %06x" % device_id)
        # verify tag + counter check
        last = self.counters.get(device_id)
        try:
            fcnt = self._verify(device, frame, last, header)
        except codec.ProtocolError as e:
            # dedup: a "replay" of the identical bytes just accepted is the same frame heard again
            if e.reason == "replay" and self._is_duplicate(device, e.fcnt, frame, now):
                self._duplicate(device, e.fcnt, source, rec, now, batch)
                return 0
            if e.reason in ("bad_tag", "fcnt_gap"):  # perhaps a counter this gateway lost track of
                recovered = self._hold(device, frame, source, rec, now, batch)
                if recovered is not None:
                    return recovered
            raise codec.ProtocolError(e.reason, "device %s: %s" % (device.dev, e.detail)) from None
        floor = self.counters.get(device_id)  # the fleet's, when it knew more than this gateway
        if self.shared is not None and codec.explicit_fcnt(frame) is None:
            # claimed with the rest of the group; as of now a second copy in this group is a duplicate
            self._advance(device, fcnt, batch)
            self.dedup.remember(device_id, fcnt, frame, now)
            self._to_claim.append((device, frame, fcnt, source, rec, now, self._prepare(device, frame, fcnt)))
            return 0
        n = self._claim_group(batch) if self._to_claim else 0  # a hello is claimed in order, after what came before
        n += self._accept(device, frame, fcnt, source, rec, now, batch)
        if codec.explicit_fcnt(frame) is not None:
            if floor is None or fcnt - floor > codec.MAX_FCNT_GAP:
                self.metrics.resynced.inc()
                logs.event(log, logging.INFO, "counter resynchronised from hello", device=device.dev, fcnt=fcnt, last_fcnt=floor)
            if device_id in self.held:
                n += self._recover(device, fcnt, floor, now, batch)
        return n

    def _verify(self, device, frame, last, header):
        """Against this gateway's counter; when that fails, against the fleet's (another gateway
        accepted this bin's recent frames) — the claim then settles replays either way."""
        try:
            return codec.verify(frame, device.key, last, header)
        except codec.ProtocolError as e:
            if self.shared is None or e.reason not in ("bad_tag", "fcnt_gap"):
                raise  # a replay here is one for the fleet too: its counter is never behind this one
            fleet = self.shared.last(device)
            if fleet is None or (last is not None and fleet <= last):
                raise e from None
            self.counters[device.device_id] = fleet
            return codec.verify(frame, device.key, fleet, header)

    def _is_duplicate(self, device, fcnt, frame, now):
        if self.dedup.is_duplicate(device.device_id, fcnt, frame, now):
            return True
        return self.shared is not None and self.shared.is_duplicate(device, fcnt, digest(frame).hex())

    def _duplicate(self, device, fcnt, source, rec, now, batch):
        self.metrics.duplicates.inc()
        batch.receptions.append((device.device_id, fcnt, source, rec.rssi, rec.snr, now, 1))
        log.debug("duplicate", extra={"fields": {"device": device.dev, "fcnt": fcnt, "source": source, "rssi": rec.rssi}})

    def _claim_group(self, batch):
        queued, self._to_claim = self._to_claim, []
        verdicts = self.shared.claim_many([(q[0], q[2], q[6][2], q[6][3]) for q in queued], self.cfg.redis.dedup_ttl_s)
        n = 0
        for (device, frame, fcnt, source, rec, now, prepared), verdict in zip(queued, verdicts):
            try:
                n += self._settle(device, frame, fcnt, source, rec, now, batch, prepared, verdict)
            except codec.ProtocolError as e:
                self._reject(e.reason, source, e.detail)
        return n

    def _prepare(self, device, frame, fcnt):
        """decode → calibrate: (decoded, [((reading, flag bits, fill), fcnt, age s)], digest hex, newest reading
        for the fleet's bin state (fcnt, fill, flag bits) or None); the last two with shared state only."""
        decoded = codec.decode_body(frame, fcnt)
        if decoded["type"] == "reading":
            readings = [(self._calibrated(device, decoded), fcnt, 0)]
        elif decoded["type"] == "backlog":
            readings = [(self._calibrated(device, e), e["fcnt"], 60 * e["age_min"]) for e in decoded["readings"]]
        else:
            readings = []
        if self.shared is None:
            return decoded, readings, None, None  # digest and bin state are for fleet-wide claims only
        newest = max(readings, key=lambda r: r[1]) if readings else None
        update = (newest[1], newest[0][2], newest[0][1]) if newest else None
        return decoded, readings, digest(frame).hex(), update

    def _accept(self, device, frame, fcnt, source, rec, now, batch, claimed=False):
        """A verified frame: decoded, calibrated, claimed fleet-wide (when shared), its messages batched."""
        prepared = self._prepare(device, frame, fcnt)
        if self.shared is None or claimed:
            verdict = ("claimed", None)  # one gateway alone, or a claim this gateway already holds
        else:
            verdict = self.shared.claim(device, fcnt, prepared[2], self.cfg.redis.dedup_ttl_s, prepared[3])
        return self._settle(device, frame, fcnt, source, rec, now, batch, prepared, verdict)

    def _settle(self, device, frame, fcnt, source, rec, now, batch, prepared, verdict):
        """What the claim decided: another gateway publishes it, a replay, or this gateway's messages."""
        device_id = device.device_id
        decoded, readings, dig, _ = prepared
        verdict, fleet_bin = verdict
        if verdict in ("duplicate", "pending"):  # another gateway heard it first and publishes it
            self._advance(device, fcnt, batch)
            self.dedup.remember(device_id, fcnt, frame, now)
            self._duplicate(device, fcnt, source, rec, now, batch)
            if verdict == "pending":  # ... unless it dies before its commit
                self.standby[(device_id, device.key_epoch, fcnt)] = (device, frame, source, rec, now)
            return 0
        if verdict in ("replay", "stale_key"):
            raise codec.ProtocolError(verdict, "device %s: counter %d, refused by the shared state" % (device.dev, fcnt))
        if verdict == "ok" and self.shared is not None:
            self._claims.append((device, fcnt, dig))
            mine = self.bins.get(device.bin_id)
            if fleet_bin is not None and (mine is None or mine.is_newer(device.key_epoch, fleet_bin[0])):
                # another gateway published this bin's newer readings: events compare with those
                self.bins[device.bin_id] = BinState(device.key_epoch, *fleet_bin, now)
        self._advance(device, fcnt, batch)
        self.dedup.remember(device_id, fcnt, frame, now)
        batch.accepted += 1
        if decoded["type"] == "hello":
            rx = dict(self._rx_base, source=source, rssi=rec.rssi, snr=rec.snr, received_at=now)
            batch.messages.append(Message(*integrate.hello_message(self.cfg.base_topic, device, decoded, rx), now, Kind.HELLO,
                                          device_id, device.key_epoch, fcnt))
            logs.event(log, logging.INFO, "hello", bin=device.bin_id, device=device.dev, fw=decoded["fw_version"],
                       reset_cause=decoded["reset_cause"], rssi=rec.rssi, source=source)
            if self.firmware.get(device.dev) != decoded["fw_version"]:
                self.firmware[device.dev] = decoded["fw_version"]
                self.forecasts.set_firmware(device.dev, decoded["fw_version"])
                if self.on_new_firmware:
                    self.on_new_firmware(device.dev, decoded["fw_version"])
            return 0
        backlog = decoded["type"] == "backlog"
        tail = self._tail(device, source)
        for (reading, bits, fill), reading_fcnt, age_s in readings:
            self._reading(device, reading, bits, fill, reading_fcnt, rec, now, age_s, tail, batch, backlog)
        return len(readings)

    def _tail(self, device, source):
        """The end of a reading's records (bin, source, gateway): the same for most frames."""
        key = (device.bin_id, source)  # not the device: hashing a dataclass hashes every field
        tail = self._tails.get(key)
        if tail is None:
            if len(self._tails) > 4 * len(self.devices) + 64:  # retired bins leave entries behind
                self._tails.clear()
            tail = self._tails[key] = integrate.record_tail(device, source, self.cfg.gateway_id)
        return tail

    def _topics(self, device):
        """(event topic, state topic) of a device's bin."""
        topics = self._bin_topics.get(device.bin_id)
        if topics is None:
            base = self.cfg.base_topic
            topics = self._bin_topics[device.bin_id] = (integrate.event_topic(base, device.bin_id),
                                                        integrate.state_topic(base, device.bin_id))
        return topics

    def _calibrated(self, device, reading):
        """(reading, its flag bits with the gateway's low-battery flag, fill %)."""
        bits = codec.flag_bits(reading["flags"])
        if reading["battery_mv"] < self.cfg.events.low_battery_mv and not bits & codec.F_LOW_BATTERY:
            bits |= codec.F_LOW_BATTERY
            reading = dict(reading, flags=codec.flag_names(bits))
        return reading, bits, calibration.fill_pct(device, reading)

    def _take_over(self, now, batch):
        """Frames whose claim a peer never confirmed: that peer died between claim and commit;
        the first gateway that heard the same bytes publishes them instead."""
        n = 0
        for key, (device, frame, source, rec, at) in list(self.standby.items()):
            if now - at < STANDBY_S:
                continue
            del self.standby[key]
            if self.devices.get(device.device_id) is not device:
                continue  # re-keyed or retired meanwhile
            dig = digest(frame).hex()
            if self.shared.take_over(device, key[2], dig):
                logs.event(log, logging.WARNING, "took over a reading a peer claimed but never stored",
                           device=device.dev, fcnt=key[2])
                self._claims.append((device, key[2], dig))
                n += self._accept(device, frame, key[2], source, rec, at, batch, claimed=True)
        return n

    def _advance(self, device, fcnt, batch):
        if fcnt > self.counters.get(device.device_id, -1):
            self.counters[device.device_id] = fcnt
            batch.counters[device.device_id] = Counter(fcnt, device.key_id, device.key_epoch)

    def _hold(self, device, frame, source, rec, now, batch):
        """Keeps a frame no counter known here verifies, until a hello names the bin's counter or
        two held frames reveal it (codec.search_counter). Returns readings recovered, or None."""
        held = self.held.get(device.device_id)
        if held is None:
            held = self.held[device.device_id] = deque(maxlen=HELD_PER_DEVICE)
        held.append((frame, source, rec, now))
        if (len(held) < 2 or codec.explicit_fcnt(frame) is not None
                or now - self._searched.get(device.device_id, -1e9) < SEARCH_EVERY_S
                or now - self._searched.get(None, -1e9) < SEARCH_GAP_S):
            return None  # the held frames wait for the next chance or the bin's hello
        self._searched[device.device_id] = self._searched[None] = now
        floor = self.counters.get(device.device_id)
        try:
            fcnt = codec.search_counter(frame, [h[0] for h in list(held)[-2::-1][:4]], device.key, floor)
        except codec.ProtocolError:
            return None
        self.metrics.resynced.inc()
        logs.event(log, logging.INFO, "counter resynchronised from two frames", device=device.dev, fcnt=fcnt, last_fcnt=floor)
        return self._recover(device, fcnt + 1, floor, now, batch)

    def _recover(self, device, anchor, floor, now, batch):
        """Frames held before a resynchronising hello: each verified with the counter below the
        hello's that its 16 bits name (one tag check, as for any frame), above the counter this
        gateway had accepted before, and claimed like any frame. Returns readings accepted."""
        n = 0
        for frame, source, rec, at in self.held.pop(device.device_id):
            if now - at > HELD_MAX_AGE_S:
                continue
            try:
                fcnt = codec.verify_before(frame, device.key, anchor, floor)
                n += self._accept(device, frame, fcnt, source, rec, at, batch)
            except codec.ProtocolError:
                continue  # corrupt or forged after all: already counted when it arrived
            self.metrics.recovered.inc()
        return n

    def _reading(self, device, reading, bits, fill, fcnt, rec, now, age_s, tail, batch, backlog):
        """events → integrate, for one calibrated reading (a frame's or a backlog entry's)."""
        core = integrate.reading_core(device, reading, bits, fill, fcnt, rec.rssi, rec.snr, now, age_s,
                                      self._rx_base["time_synced"], backlog)
        topic, state_topic = self._topics(device)
        ids = (device.device_id, device.key_epoch, fcnt)
        batch.messages.append(Message(integrate.message_id(device, fcnt), topic, integrate.uplink_record(core, tail), False,
                                      now, Kind.UPLINK, *ids))
        prev = self.bins.get(device.bin_id)
        if prev is not None and not prev.is_newer(device.key_epoch, fcnt):
            return  # older than the bin's current state: history only, no state or events
        prev_fill = prev.fill_pct if prev else None
        prev_flags = prev.flags if prev else None
        forecast = integrate.forecast_part(device, *self.forecasts.update(device.bin_id, now - age_s, fill))
        for name in events.detect(prev_fill, prev_flags, fill, bits, self.cfg.events):
            batch.messages.append(Message(integrate.message_id(device, fcnt, name), topic,
                                          integrate.record(name, core, forecast, tail), False, now, Kind.ALARM, *ids))
            logs.event(log, logging.INFO, "event", event=name, bin=device.bin_id, device=device.dev, fcnt=fcnt)
        # only a bin's newest state of a group is written (the outbox conflates pending states too)
        batch.states[device.bin_id] = Message(integrate.message_id(device, fcnt, "state"), state_topic,
                                              integrate.record("state", core, forecast, tail), True, now, Kind.STATE,
                                              *ids, device.bin_id)
        state = BinState(device.key_epoch, fcnt, prev_fill if fill is None else fill, bits, now)  # a fault keeps the level
        self.bins[device.bin_id] = state
        batch.bins[device.bin_id] = state
