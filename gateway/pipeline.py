"""The uplink path: one record (uplink.Uplink) walked through named stages, as ChirpStack's
uplink/data.rs does — see Pipeline._handle:

  read (serial_input) → deframe (module_formats) → identify → verify tag and counter → dedup →
  decode and calibrate → claim (shared state) → events → integrate → outbox (one group commit)

With several gateways the counter check and dedup also ask the shared state (Redis): the fleet's
counter when the local one does not verify a frame, and a claim that makes one gateway the
publisher of each frame (shared_state.py).

Every rejection raises codec.ProtocolError with an uplink.Reason, is counted and logged; nothing raises on bad input."""
import logging
import os
import time

from binlink.wire import codec
from binlink.gateway import calibration, downlink, events, forecast, integrate, logs
from binlink.gateway.clock import ClockCheck, clock_synced
from binlink.gateway.dedup import Dedup, digest
from binlink.gateway.heads import WINDOW, BinState, Counter, shifted, without_older_keys
from binlink.gateway.outbox import Batch, Kind, Message
from binlink.gateway.rejections import Rejections
from binlink.gateway.resync import Resync
from binlink.gateway.storage import StorageFull, StorageGuard
from binlink.gateway.uplink import Outcome, Reading, Reason, Uplink, Verdict

log = logs.get("pipeline")
STANDBY_S = 3.0  # a peer's pending claim older than this: the peer died before its commit
RECEPTIONS_KEPT = 8  # receptions stored per frame heard again within the dedup window; more are only counted


class Pipeline:
    def __init__(self, cfg, devices, outbox, metrics, clock=time.time, shared=None):
        self.cfg = cfg
        self.outbox = outbox
        self.metrics = metrics
        self.clock = clock
        self.shared = shared  # SharedState or None (one gateway alone)
        self.dedup = Dedup(cfg.dedup_window_s)
        self.bins = {}  # bin_id -> BinState
        self.resync = Resync(metrics)
        self.standby = {}  # (device_id, epoch, fcnt) -> Uplink: a peer's pending claim
        self._claims = []  # (device, fcnt, digest hex) claimed in this group, confirmed after the commit
        self._to_claim = []  # verified uplinks of this group, claimed together in one round trip
        self.addresses = integrate.Addresses(cfg.base_topic, cfg.gateway_id)
        self.set_devices(devices)
        # derived data beside the outbox, saved every few minutes: a crash costs the last minutes' learning
        self.forecasts = forecast.ForecastStore(os.path.join(os.path.dirname(os.path.abspath(outbox.path)),
                                                             "forecast.sqlite"), cfg.events.emptied_drop_pct, cfg.events.full_pct)
        self.firmware = self.forecasts.firmware()  # device hex -> version from its last hello
        self.on_new_firmware = None  # called when a hello brings a version not seen before
        self.time_synced, self._log_limit, self.listening = False, logs.RateLimit(per_minute=20), []
        self.rejections = Rejections(cfg, metrics, clock)
        self.storage = StorageGuard(metrics, outbox.path)
        self.clock_check = ClockCheck(metrics)

    def close(self):
        self.forecasts.close()

    def set_devices(self, devices):
        """Uses this registry from now on. A device whose key changed (re-provisioned: its counter
        starts again at 0) gets a fresh counter; keeping the old one would call every frame a replay.
        An entry of an older key epoch than its counter's (an old backup restored) is left out."""
        self.devices = devices = without_older_keys(devices, self.outbox.counters())
        self.counters = {}  # device_id -> last accepted fcnt
        self.stored = {}  # device_id -> heads.Counter.stored: readings stored in the window below it
        epochs = {d.bin_id: d.key_epoch for d in devices.values()}
        for bin_id, state in self.outbox.bins().items():  # a migrated state's epoch is its device's now
            self.bins.setdefault(bin_id, state if state.key_epoch is not None or bin_id not in epochs
                                 else state._replace(key_epoch=epochs[bin_id]))
        for dev_id, counter in self.outbox.counters().items():
            device = devices.get(dev_id)
            if device is None:
                continue
            if device.key_id == counter.key_id:
                self.counters[dev_id], self.stored[dev_id] = counter.fcnt, counter.stored
                if self.shared is not None:  # pushed again whenever Redis comes back empty
                    self.shared.remember(device, counter.fcnt)
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
        self.time_synced = self.clock_check.plausible(now) and clock_synced() and not getattr(self.clock, "simulated", False)
        batch, self.listening = Batch(), []  # listening: accepted uplinks to answer or learn from (downlink.py)
        readings = self._take_over(now, batch) if self.standby else 0
        read = {}
        for source, rec in items:
            read[source] = read.get(source, 0) + 1
            up = Uplink(source, rec, now)
            try:
                readings += self._handle(up, batch)
            except codec.ProtocolError as e:
                up.outcome = Outcome.REJECTED
                self.rejections.count(e.reason, source, e.detail)
                self.rejections.tell_installers(e.reason, up, batch)
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

    def _handle(self, up, batch):
        """One uplink, stage by stage; returns the readings it added to the batch."""
        if not self._deframed(up):  # a module's status line
            return 0
        self._identify(up)
        recovered = self._verify(up, batch)
        if up.outcome is not None:  # a duplicate, or held until its counter is found (then: what that recovered)
            return recovered
        self._decode(up)
        if self._queue_claim(up, batch):  # several gateways: claimed with the rest of the group
            return 0
        n = self._claim_group(batch) if self._to_claim else 0  # a hello is claimed after what came before it
        n += self._settle(up, self._claim(up), batch)
        return n + self._resync_from_hello(up, batch)

    # stages -------------------------------------------------------------------------------------
    def _deframed(self, up):
        """The module format split the stream already; its rejections arrive here."""
        rec = up.reception
        if rec.frame is not None:
            return True
        if rec.reason == "status":
            self.metrics.module_status.inc()
            up.outcome = Outcome.STATUS
            return False
        raise codec.ProtocolError(rec.reason, rec.detail)

    def _identify(self, up):
        """parse the header; the device it names must be in the registry."""
        up.header = codec.parse_header(up.frame)
        up.device = self.devices.get(up.header[1])
        if up.device is None:
            raise codec.ProtocolError(Reason.UNKNOWN_DEVICE, "device %06x" % up.header[1])

    def _verify(self, up, batch):
        """verify the tag and the counter → dedup. A copy of a frame accepted before ends here as a duplicate;
        a frame no counter known here verifies is held (resync.py). Returns readings a resync recovered."""
        device = up.device
        last = self.counters.get(device.device_id)
        try:
            up.fcnt = self._verified_fcnt(device, up.frame, last, up.header)
        except codec.ProtocolError as e:
            # dedup: a "replay" of the identical bytes just accepted is the same frame heard again
            if e.reason == Reason.REPLAY and self._is_duplicate(device, e.fcnt, up.frame, up.received_at):
                up.outcome = Outcome.DUPLICATE
                self._duplicate(up, e.fcnt, batch)
                return 0
            if e.reason in (Reason.BAD_TAG, Reason.FCNT_GAP) and (found := self.resync.hold(up, last)) is not None:
                up.outcome = Outcome.HELD
                return self._recover(device, found + 1, last, batch)
            raise codec.ProtocolError(e.reason, "device %s: %s" % (device.dev, e.detail)) from None
        up.last_fcnt = self.counters.get(device.device_id)  # the fleet's, when it knew more than this gateway
        return 0

    def _verified_fcnt(self, device, frame, last, header):
        """Against this gateway's counter, else the fleet's (the claim settles replays either way)."""
        try:
            return codec.verify(frame, device.key, last, header)
        except codec.ProtocolError as e:
            if self.shared is None or e.reason not in (Reason.BAD_TAG, Reason.FCNT_GAP):
                raise  # a replay here is one for the fleet too: its counter is never behind this one
            fleet = self.shared.last(device)
            if fleet is None or (last is not None and fleet <= last):
                raise e from None
            fcnt = codec.verify(frame, device.key, fleet, header)  # first: a number in Redis alone moves nothing
            self.counters[device.device_id] = fleet
            return fcnt

    def _decode(self, up):
        """decode → calibrate: the hello's fields, or each reading with its fill and low-battery flag."""
        frame, device = up.frame, up.device
        up.frame_type = frame[0] & 0x0F
        if up.frame_type == codec.T_HELLO:
            up.hello = codec.hello_fields(frame)
            return
        low_mv = self.cfg.events.low_battery_mv
        for fcnt, age_min, distance, temperature, mv, flags, valid, pings in codec.readings(frame, up.fcnt):
            if mv < low_mv:
                flags |= codec.F_LOW_BATTERY
            up.readings.append(Reading(fcnt, 60 * age_min, distance, temperature, mv, flags, valid, pings,
                                       calibration.fill_pct(device, distance, flags)))

    def _queue_claim(self, up, batch):
        """Several gateways: a reading is claimed with its group in one round trip (a hello alone, in order)."""
        if self.shared is None or codec.explicit_fcnt(up.frame) is not None:
            return False
        if self._advance(up.device, up.fcnt):
            self._book(up.device, batch)
        self.dedup.remember(up.device.device_id, up.fcnt, up.frame, up.received_at)
        up.digest = digest(up.frame).hex()
        up.outcome = Outcome.CLAIMING
        self._to_claim.append(up)
        return True

    def _claim_group(self, batch):
        queued, self._to_claim = self._to_claim, []
        verdicts = self.shared.claim_many([(u.device, u.fcnt, u.digest, u.newest()) for u in queued],
                                          self.cfg.redis.dedup_ttl_s)
        n = 0
        for up, verdict in zip(queued, verdicts):
            try:
                n += self._settle(up, verdict, batch)
            except codec.ProtocolError as e:
                up.outcome = Outcome.REJECTED
                self.rejections.count(e.reason, up.source, e.detail)
        return n

    def _claim(self, up):
        """(Verdict, the fleet's bin state or None) for one uplink."""
        if self.shared is None:
            return Verdict.MINE, None
        up.digest = digest(up.frame).hex()
        return self.shared.claim(up.device, up.fcnt, up.digest, self.cfg.redis.dedup_ttl_s, up.newest())

    def _settle(self, up, claim, batch):
        """What the claim decided: another gateway publishes it, a replay, or this gateway's
        messages (events → integrate). Returns readings added to the batch."""
        device, fcnt, n = up.device, up.fcnt, 0
        verdict, fleet_bin = claim
        if verdict in (Verdict.DUPLICATE, Verdict.PENDING):  # another gateway heard it first and publishes it
            if self._advance(device, fcnt):
                self._book(device, batch)
            self._duplicate(up, fcnt, batch)
            up.outcome = Outcome.DUPLICATE
            if verdict == Verdict.PENDING:  # ... unless it dies before its commit
                self.standby[(device.device_id, device.key_epoch, fcnt)] = up
                up.outcome = Outcome.STANDBY
            return 0
        if verdict in (Verdict.REPLAY, Verdict.STALE_KEY):
            raise codec.ProtocolError(verdict, "device %s: counter %d, refused by the shared state" % (device.dev, fcnt))
        if verdict == Verdict.OK:
            self._claims.append((device, fcnt, up.digest))
            mine = self.bins.get(device.bin_id)
            if fleet_bin is not None and (mine is None or mine.is_newer(device.key_epoch, fleet_bin[0])):
                # another gateway published this bin's newer readings: events compare with those
                self.bins[device.bin_id] = BinState(device.key_epoch, *fleet_bin, up.received_at)
        moved = self._advance(device, fcnt)
        self.dedup.remember(device.device_id, fcnt, up.frame, up.received_at)
        batch.accepted, up.outcome = batch.accepted + 1, Outcome.ACCEPTED
        if up.frame_type != codec.T_READING or downlink.asks(up):  # hellos, batches, listening (answered after the commit)
            self.listening.append(up)
        if up.hello is not None:
            self._hello(up, batch)
        tail = self.addresses.tail(device, up.source, len(self.devices))
        for reading in up.readings:  # none in a hello
            late = reading.fcnt != up.fcnt  # a backlog entry, or a reading frame's echo
            if self._store_once(device, reading.fcnt):
                self._reading(up, reading, tail, late, batch)
                n += 1
                if late and up.frame_type == codec.T_READING:
                    self.metrics.echo_saved.inc()
            elif up.frame_type == codec.T_BACKLOG:  # a backlog entry repeating a reading stored before: the bin thought it lost
                self.metrics.duplicates.inc()
        if up.readings and not n:
            self.metrics.repeated.inc()
        if moved or n:  # one booking of the counter and its window per frame
            self._book(device, batch)
        return n

    def _resync_from_hello(self, up, batch):
        """A version 2 hello names the bin's full counter: frames held for it can be verified now."""
        if codec.explicit_fcnt(up.frame) is None:
            return 0
        device, floor = up.device, up.last_fcnt
        if floor is None or up.fcnt - floor > codec.MAX_FCNT_GAP:
            self.metrics.resynced.inc()
            logs.event(log, logging.INFO, "counter resynchronised from hello", device=device.dev, fcnt=up.fcnt, last_fcnt=floor)
        return self._recover(device, up.fcnt, floor, batch) if device.device_id in self.resync else 0

    def _recover(self, device, anchor, floor, batch):
        """Frames held before a resynchronisation, verified below the anchor (resync.release), claimed like any frame."""
        n = 0
        for up in self.resync.release(device, anchor, floor, self.clock()):
            try:
                self._decode(up)
                n += self._settle(up, self._claim(up), batch)
            except codec.ProtocolError:
                continue  # the fleet refused it (a peer's counter is past it)
            self.metrics.recovered.inc()
        return n

    def _take_over(self, now, batch):
        """Frames a peer claimed but never stored (it died): the first gateway that heard them publishes them."""
        n = 0
        for key, up in list(self.standby.items()):
            if now - up.received_at < STANDBY_S:
                continue
            del self.standby[key]
            if self.devices.get(up.device.device_id) is not up.device:
                continue  # re-keyed or retired meanwhile
            if self.shared.take_over(up.device, up.fcnt, up.digest):
                logs.event(log, logging.WARNING, "took over a reading a peer claimed but never stored",
                           device=up.device.dev, fcnt=up.fcnt)
                self._claims.append((up.device, up.fcnt, up.digest))
                n += self._settle(up, (Verdict.MINE, None), batch)
        return n

    # messages -----------------------------------------------------------------------------------
    def _hello(self, up, batch):
        device = up.device
        rx = {"gateway": self.cfg.gateway_id, "time_synced": self.time_synced, "source": up.source,
              "rssi": up.reception.rssi, "snr": up.reception.snr, "received_at": up.received_at}
        batch.messages.append(Message(*integrate.hello_message(self.cfg.base_topic, device, up.fcnt, up.hello, rx),
                                      up.received_at, Kind.HELLO, device.device_id, device.key_epoch, up.fcnt))
        fw_version, reset_cause, _ = up.hello
        logs.event(log, logging.INFO, "hello", bin=device.bin_id, device=device.dev, fw=fw_version,
                   reset_cause=reset_cause, rssi=up.reception.rssi, source=up.source)
        if self.firmware.get(device.dev) != fw_version:
            self.firmware[device.dev] = fw_version
            self.forecasts.set_firmware(device.dev, fw_version)
            if self.on_new_firmware:
                self.on_new_firmware(device.dev, fw_version)

    def _reading(self, up, reading, tail, backlog, batch):
        """events → integrate, for one calibrated reading (a frame's or a backlog entry's)."""
        device, fcnt, now, fill = up.device, reading.fcnt, up.received_at, reading.fill_pct
        core = integrate.reading_core(device, reading, up.reception.rssi, up.reception.snr, now, self.time_synced, backlog)
        topic, state_topic = self.addresses.topics(device)
        ids = (device.device_id, device.key_epoch, fcnt)
        batch.messages.append(Message(integrate.message_id(device, fcnt), topic, integrate.uplink_record(core, tail), False,
                                      now, Kind.UPLINK, *ids))
        prev = self.bins.get(device.bin_id)
        if prev is not None and not prev.is_newer(device.key_epoch, fcnt):
            return  # older than the bin's current state: history only, no state or events
        prev_fill = prev.fill_pct if prev else None
        forecast = integrate.forecast_part(device, *self.forecasts.update(device.bin_id, now - reading.age_s, fill))
        for name in events.detect(prev_fill, prev.flags if prev else None, fill, reading.flags, self.cfg.events):
            batch.messages.append(Message(integrate.message_id(device, fcnt, name), topic,
                                          integrate.record(name, core, forecast, tail), False, now, Kind.ALARM, *ids))
            logs.event(log, logging.INFO, "event", event=name, bin=device.bin_id, device=device.dev, fcnt=fcnt)
        # only a bin's newest state of a group is written (the outbox conflates pending states too)
        batch.states[device.bin_id] = Message(integrate.message_id(device, fcnt, "state"), state_topic,
                                              integrate.record("state", core, forecast, tail), True, now, Kind.STATE,
                                              *ids, device.bin_id)
        state = BinState(device.key_epoch, fcnt, prev_fill if fill is None else fill, reading.flags, now)  # a fault keeps the level
        self.bins[device.bin_id] = state
        batch.bins[device.bin_id] = state

    # bookkeeping --------------------------------------------------------------------------------
    def _advance(self, device, fcnt):
        """True when fcnt moves the device's counter (and its stored-readings window) forward."""
        dev = device.device_id
        last = self.counters.get(dev)
        if last is not None and fcnt <= last:
            return False
        self.counters[dev] = fcnt
        self.stored[dev] = shifted(self.stored.get(dev, 0), WINDOW if last is None else fcnt - last)
        return True

    def _book(self, device, batch):
        dev = device.device_id
        batch.counters[dev] = Counter(self.counters[dev], device.key_id, device.key_epoch, self.stored[dev])

    def _store_once(self, device, fcnt):
        """False for a reading already stored (its bit in the counter's window); else marks it."""
        dev = device.device_id
        behind = self.counters[dev] - fcnt  # the frame's counter advanced already
        if behind >= WINDOW:  # a frame held for a resync, or overtaken in its group: cannot be told
            return True
        if self.stored[dev] >> behind & 1:
            return False
        self.stored[dev] |= 1 << behind
        return True

    def _is_duplicate(self, device, fcnt, frame, now):
        if self.dedup.is_duplicate(device.device_id, fcnt, frame, now):
            return True
        return self.shared is not None and self.shared.is_duplicate(device, fcnt, digest(frame).hex())

    def _duplicate(self, up, fcnt, batch):
        """Counted every time; a reception row for the first copies only (a flood costs no disk)."""
        self.metrics.duplicates.inc()
        self.dedup.remember(up.device.device_id, fcnt, up.frame, up.received_at)  # a peer's too: counted from now
        if self.dedup.heard_again(up.device.device_id, fcnt) <= RECEPTIONS_KEPT:
            batch.receptions.append((up.device.device_id, fcnt, up.source, up.reception.rssi, up.reception.snr, up.received_at, 1))

    def _refuse(self, batch, error):
        """Disk full: the batch's frames are refused (storage_full), counters and states back to the disk's."""
        self.storage.refuse(error, batch.accepted)
        self.bins = {}
        self.set_devices(self.devices)
