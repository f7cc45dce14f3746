"""The uplink path, one named stage after another (as ChirpStack does):

  read (serial_input) → deframe (module_formats) → parse → verify tag → counter check →
  dedup → decode → calibrate (calibration) → events → integrate → outbox (one group commit)

Every rejection is counted under its reason code and logged; nothing here raises on bad input."""
import logging
import os
import time

from binlink.wire import codec
from binlink.gateway import calibration, events, forecast, integrate, logs
from binlink.gateway.dedup import Dedup
from binlink.gateway.outbox import Batch

log = logs.get("pipeline")


def clock_synced():
    """True when systemd-timesyncd (or chrony with its flag) says the clock is synchronised."""
    return os.path.exists("/run/systemd/timesync/synchronized")


class Pipeline:
    def __init__(self, cfg, devices, outbox, metrics, clock=time.time):
        self.cfg = cfg
        self.outbox = outbox
        self.metrics = metrics
        self.clock = clock
        self.dedup = Dedup(cfg.dedup_window_s)
        self.set_devices(devices)
        self.bins = outbox.bins()  # bin_id -> (fcnt, fill_pct, flags, updated_at)
        # derived data beside the outbox, committed after it: a crash costs the last readings' learning
        self.forecasts = forecast.ForecastStore(os.path.join(os.path.dirname(os.path.abspath(outbox.path)), "forecast.sqlite"),
                                                cfg.events.emptied_drop_pct)
        self.firmware = self.forecasts.firmware()  # device hex -> version from its last hello
        self.on_new_firmware = None  # called when a hello brings a version not seen before
        self._rx_base = {"gateway": cfg.gateway_id, "time_synced": False}
        self._log_limit = logs.RateLimit(per_minute=20)

    def set_devices(self, devices):
        """Uses this registry from now on. A device whose key changed (re-provisioned: its counter
        starts again at 0) gets a fresh counter; keeping the old one would call every frame a replay."""
        self.devices = devices
        self.counters = {}
        for dev_id, (last, key_id) in self.outbox.counters().items():
            device = devices.get(dev_id)
            if device is None:
                continue
            if device.key_id == key_id:
                self.counters[dev_id] = last
            else:
                logs.event(log, logging.WARNING, "new key for device: its frame counter starts again",
                           device=device.dev, bin=device.bin_id, last_fcnt=last)

    def process(self, items):
        """items: iterable of (source name, Reception). Commits once; returns readings committed."""
        now = self.clock()
        # per group, not once at start: a Pi without an RTC boots unsynchronised and syncs later
        self._rx_base["time_synced"] = clock_synced()
        batch = Batch()
        readings = 0
        read = {}
        for source, rec in items:
            read[source] = read.get(source, 0) + 1
            try:
                readings += self._one(source, rec, now, batch)
            except codec.ProtocolError as e:
                self._reject(e.reason, source, e.detail)
        for source, n in read.items():
            self.metrics.frames_read.labels(source).inc(n)
        if batch:
            self.metrics.outbox_depth.inc(self.outbox.commit(batch))
            # counted once on disk: a crash before the commit must not show as accepted
            self.metrics.accepted.inc(batch.accepted)
            self.metrics.readings.inc(readings)
            self.forecasts.save()
        self.dedup.expire(now)
        return readings

    def _reject(self, reason, source, detail=""):
        self.metrics.rejected.labels(reason).inc()
        if self._log_limit.allow(reason, self.clock()):
            logs.event(log, logging.WARNING, "frame rejected", reason=reason, source=source, detail=detail)

    def _one(self, source, rec, now, batch):
        # deframe: the module format already split the stream; its rejections arrive here
        if rec.frame is None:
            if rec.reason == "status":
                self.metrics.module_status.inc()
                return 0
            raise codec.ProtocolError(rec.reason, rec.detail)
        frame = rec.frame
        # parse
        ftype, device_id, _ = codec.parse_header(frame)
        device = self.devices.get(device_id)
        if device is None:
            raise codec.ProtocolError("unknown_device", "device %06x" % device_id)
        # verify tag + counter check
        last = self.counters.get(device_id)
        try:
            fcnt = codec.verify(frame, device.key, last)
        except codec.ProtocolError as e:
            # dedup: a "replay" of the identical bytes just accepted is the same frame heard again
            if e.reason == "replay" and self.dedup.is_duplicate(device_id, e.fcnt, frame, now):
                self.metrics.duplicates.inc()
                batch.receptions.append((device_id, e.fcnt, source, rec.rssi, rec.snr, now, 1))
                log.debug("duplicate", extra={"fields": {"device": device.dev, "fcnt": e.fcnt, "source": source, "rssi": rec.rssi}})
                return 0
            raise codec.ProtocolError(e.reason, "device %s: %s" % (device.dev, e.detail)) from None
        self.counters[device_id] = fcnt
        batch.counters[device_id] = (fcnt, device.key_id)
        self.dedup.remember(device_id, fcnt, frame, now)
        # decode
        decoded = codec.decode_body(frame, fcnt)
        batch.accepted += 1
        rx = dict(self._rx_base, source=source, rssi=rec.rssi, snr=rec.snr, received_at=now)
        base = self.cfg.base_topic
        if decoded["type"] == "hello":
            batch.messages.append(integrate.hello_message(base, device, decoded, rx) + (now,))
            logs.event(log, logging.INFO, "hello", device=device.dev, fw=decoded["fw_version"], reset_cause=decoded["reset_cause"])
            if self.firmware.get(device.dev) != decoded["fw_version"]:
                self.firmware[device.dev] = decoded["fw_version"]
                self.forecasts.set_firmware(device.dev, decoded["fw_version"])
                if self.on_new_firmware:
                    self.on_new_firmware()
            return 0
        if decoded["type"] == "reading":
            self._reading(device, decoded, fcnt, rx, now, batch, backlog=False)
            return 1
        for entry in decoded["readings"]:
            self._reading(device, entry, entry["fcnt"], rx, now - 60 * entry["age_min"], batch, backlog=True)
        return len(decoded["readings"])

    def _reading(self, device, reading, fcnt, rx, measured_at, batch, backlog):
        """calibrate → events → integrate, for one reading (a frame's or a backlog entry's)."""
        base = self.cfg.base_topic
        now = rx["received_at"]
        if reading["battery_mv"] < self.cfg.events.low_battery_mv and "low_battery" not in reading["flags"]:
            reading = dict(reading, flags=reading["flags"] + ["low_battery"])
        fill = calibration.fill_pct(device, reading)
        fields = integrate.reading_fields(device, reading, fill, fcnt, rx, measured_at)
        batch.messages.append(integrate.event_message(base, device, fields, "uplink", backlog) + (now,))
        prev = self.bins.get(device.bin_id)
        if prev is not None and fcnt <= prev[0]:
            return  # older than the bin's current state: history only, no state or events
        prev_fill = prev[1] if prev else None
        prev_flags = prev[2] if prev else None
        fill_for_state = prev_fill if fill is None else fill  # a faulty reading keeps the last level
        fields = integrate.with_forecast(fields, device, *self.forecasts.update(device.bin_id, measured_at, fill))
        for name in events.detect(prev_fill, prev_flags, fill, reading["flags"], self.cfg.events):
            batch.messages.append(integrate.event_message(base, device, fields, name, backlog) + (now,))
            logs.event(log, logging.INFO, "event", event=name, bin=device.bin_id, device=device.dev, fcnt=fcnt)
        batch.states[device.bin_id] = integrate.state_message(base, device, fields) + (now,)
        state = (fcnt, fill_for_state, codec.flag_bits(reading["flags"]), now)
        self.bins[device.bin_id] = state
        batch.bins[device.bin_id] = state
