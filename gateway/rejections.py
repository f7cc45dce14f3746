"""What the pipeline does with a refused frame: counted under its reason, logged (rate-limited),
and — when its header names a device — published so a technician at a new bin sees why."""
import logging

from binlink.wire import codec
from binlink.gateway import integrate, logs
from binlink.gateway.outbox import Message

log = logs.get("pipeline")
NOTICE_EVERY_S = 10
NOTICE_MAX = 256  # distinct (device, reason) notices per NOTICE_EVERY_S


class Rejections:
    def __init__(self, cfg, metrics, clock):
        self.cfg = cfg
        self.metrics = metrics
        self.clock = clock
        self._log_limit = logs.RateLimit(per_minute=20)
        self._noticed = {}  # (device id, reason) -> when last published on .../rejected

    def count(self, reason, source, detail=""):
        self.metrics.rejected.labels(reason).inc()
        if self._log_limit.allow(reason, self.clock()):
            logs.event(log, logging.WARNING, "frame rejected", reason=reason, source=source, detail=detail)

    def tell_installers(self, reason, up, batch):
        """A frame whose header names a device but that was refused (unknown device, bad tag,
        replay, counter gap): a notice on gateway/<id>/rejected, once per device and reason every
        NOTICE_EVERY_S (noise without a header is only counted)."""
        frame, now = up.frame, up.received_at
        if frame is None or len(frame) < codec.HEADER_LEN:
            return
        try:
            _, device_id, _ = codec.parse_header(frame)
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
                                                                   reason, up.source, up.reception.rssi, now), now))
