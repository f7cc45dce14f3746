"""The publisher process (`python -m binlink.gateway.publisher_worker`, started by mqtt_publisher):
drains the outbox to the broker at QoS 1, announces Home Assistant discovery, reports acks and
counts to the service. One thread, select() over the broker, the service and the wake pipe.
mqtt_wire ends a session on anything malformed or on silence; the loop reconnects with back-off
and resends everything unacknowledged from the outbox, in order.

Everything QoS 1 shares one in-flight window: outbox rows, discovery configs (an HA restart at
10,000 bins re-announces 10,000 of them, 110,000 in per-entity mode; they take at most half the
window while readings flow), the gateway's status. A topic the broker denies (found by publish_policy.DenialFinder) is held
back: its rows stay in the outbox, the denial is logged once and counted, the topic is tried again
every DENIED_RETRY_S, and every other topic flows."""
import ctypes
import logging
import os
import select
import signal
import ssl
import sys
import time
from multiprocessing.connection import Connection

from binlink.gateway import config as config_mod, discovery, homeassistant, integrate, logs, mqtt_wire
from binlink.gateway.latency import LatencyCounts
from binlink.gateway.memory import Trimmer
from binlink.gateway.outbox_feed import OutboxUnavailable, Rows, ServiceGone
from binlink.gateway.publish_policy import Backoff, DenialFinder

log = logs.get("mqtt")
ACK_GROUP = 2000  # acknowledgements reported at once when this many are waiting ...
REPORT_S = 0.05  # ... else at most this often, and at once when nothing is left in flight
HEARTBEAT_S = 5.0  # reports at least this often, news or not (the service's watchdog counts on it)
RECONNECT_MIN_S, RECONNECT_MAX_S = 1.0, 30.0
GOOD_SESSION_S = 30.0  # a session that lasted this long resets the reconnect back-off
DENIED_RETRY_S = 600.0  # a denied topic is tried again this often (an ACL may have been fixed)
DISCOVERY_WINDOW = 256  # discovery messages in flight at most: each is a device's config (~5 KB), held until acked
PR_SET_PDEATHSIG = 1


class Worker:
    def __init__(self, conn, wake_fd, cfg, bins):
        """bins: homeassistant.BinInfo by device id; no keys ever reach this process, nor the outbox
        file: the service owns it (exclusive locking: no -shm on the SD card) and hands rows over."""
        self.conn = conn
        self.wake_fd = wake_fd
        self.cfg = cfg
        self.bins = bins
        self.firmware = {}
        # what discovery was acknowledged, kept across restarts: a restart with nothing changed
        # publishes no config (only changes, or all on Home Assistant's restart)
        self.announcer = discovery.Announcer(discovery.Discovery(
            os.path.join(cfg.state_dir, "discovery.json"), cfg.mqtt.discovery_prefix, cfg.base_topic, cfg.site,
            cfg.mqtt.discovery_mode, homeassistant.GatewayInfo.of(cfg)))
        self.rows = Rows(conn, self._handle)  # the outbox's, from the service (outbox_feed.py)
        self.status_topic = integrate.status_topic(cfg.base_topic, cfg.gateway_id)
        self.discovery_status = "%s/status" % cfg.mqtt.discovery_prefix
        self.window, m = cfg.mqtt.max_inflight, cfg.mqtt
        self.tls = mqtt_wire.tls_context(m.ca_file, m.cert_file, m.key_file) if m.tls else None
        self.password = config_mod.mqtt_password(cfg.mqtt)
        self.session, self.session_started = None, 0.0
        # mid -> (outbox id, received_at, topic) for a row; (None, discovery item or None, topic) for discovery or status
        self.inflight = {}
        self.last_fed = 0  # highest outbox id handed to the broker in this session
        self.maybe_pending = True  # the outbox may hold rows after last_fed
        self.acked, self.next_connect = [], 0.0  # outbox ids the broker acknowledged, not yet reported to the service
        self.reconnect = Backoff(RECONNECT_MIN_S, RECONNECT_MAX_S, GOOD_SESSION_S)
        self.denials = DenialFinder(DENIED_RETRY_S)
        self.denied = self.denials.held_back  # topic -> when it is tried again
        self.denials_logged = set()  # a topic's denial is logged once, however often it is tried again
        self.stop_deadline, self.storage_retry = None, 0.0
        self.topics = {}  # topic str -> bytes: a few hundred bins, encoded once
        self._log_limit = logs.RateLimit(per_minute=1)
        self.latency, self.memory = LatencyCounts(), Trimmer()
        self.counts = dict.fromkeys(("connect_failures", "unreadable_rows", "subscriptions_refused", "publishes_denied",
                                     "lost_silent", "lost_protocol", "lost_closed"), 0)
        self.connected_reported, self.last_report, self.last_sent = None, 0.0, 0.0

    # connection -------------------------------------------------------------------------------
    def _connect(self, now):
        m = self.cfg.mqtt
        try:
            s = mqtt_wire.Session(m.host, m.port, self.cfg.client_id, keepalive=m.keepalive, username=m.username,
                                  password=self.password, will=(self.status_topic, "offline", True), tls=self.tls)
        except mqtt_wire.Refused as e:
            self._connect_failed(now, "broker refused connection", reason=str(e))
            return
        except (OSError, ssl.SSLError) as e:  # ConnectionError and ProtocolError included
            self._connect_failed(now, "cannot reach broker", error=str(e) or type(e).__name__)
            return
        logs.event(log, logging.INFO, "connected to broker", host=m.host, port=m.port)
        self.session, self.session_started = s, now
        self.inflight, self.last_fed, self.maybe_pending = {}, 0, True  # resend all unacknowledged, in order
        self._publish_other(self.status_topic, "online")
        if m.discovery:
            s.subscribe(self.discovery_status)
            for topic in self.announcer.listen(m.discovery_prefix):  # what an old binlink left retained, if anything
                s.subscribe(topic)
            self._queue_discovery()
        s.flush()

    def _connect_failed(self, now, msg, **fields):
        self.counts["connect_failures"] += 1
        delay = self.reconnect.next_delay()
        if self._log_limit.allow(msg, time.monotonic()):
            m = self.cfg.mqtt
            logs.event(log, logging.ERROR, msg, host=m.host, port=m.port, retry_s=round(delay, 1), **fields)
        self.next_connect = now + delay

    def _lost(self, e):
        now = time.monotonic()
        reason = "silent" if isinstance(e, mqtt_wire.BrokerSilent) else \
            "protocol" if isinstance(e, mqtt_wire.ProtocolError) else "closed"
        self.counts["lost_" + reason] += 1
        s, self.session = self.session, None
        self._take_acks(s.salvage())
        s.close()
        self.reconnect.ran(now - self.session_started)
        delay = self.reconnect.next_delay()
        if self.stop_deadline is None:
            logs.event(log, logging.WARNING, "broker connection lost, reconnecting", reason=reason,
                       error=str(e) or type(e).__name__, retry_s=round(delay, 1))
        self.next_connect = now + delay
        if reason == "closed" and self.inflight:
            denied = self.denials.session_lost(now, [(row_id, topic) for row_id, _, topic in self.inflight.values()])
            if denied is not None:
                self.counts["publishes_denied"] += 1
                if denied not in self.denials_logged:
                    self.denials_logged.add(denied)
                    logs.event(log, logging.ERROR, "broker denies publishing to this topic (it dropped the session "
                               "with only this in flight, twice): its messages stay in the outbox, tried again every "
                               "%d s" % DENIED_RETRY_S, topic=denied)
        self.announcer.session_lost(item for row_id, item, _ in self.inflight.values() if row_id is None and item is not None)

    def _retry_denied(self, now):
        """Held-back topics due again are tried in a fresh session (it reads the outbox from the
        start), opened once the current one has nothing in flight."""
        if self.session is not None and self.inflight:
            return  # a quiet moment comes soon enough
        if self.denials.due(now) and self.session is not None:
            self.session.disconnect()
            self.session, self.next_connect = None, now

    def _careful(self):
        if self.denials.careful() and not self.inflight:  # what was sent one at a time is answered
            self.denials.progress(self.last_fed, bool(self.announcer))
        return self.denials.careful()

    def _publish_other(self, topic, payload, item=None):
        """Status and discovery: QoS 1, retained, in the window like rows."""
        if topic in self.denied:
            return
        self.inflight[self.session.publish(topic, payload, retain=True)] = (None, item, topic)

    def _queue_discovery(self, force=False, only=None):
        jobs = self.announcer.queue_changes(self.bins, self.firmware, force=force, only=only)
        logs.event(log, logging.INFO, "discovery queued" if jobs else "discovery unchanged", mode=self.cfg.mqtt.discovery_mode,
                   devices=sum(1 for j in jobs if j[2]), cleared=sum(1 for j in jobs if not j[2]))

    # outbox -----------------------------------------------------------------------------------
    def _feed(self):
        """Hands the broker what the window has room for; a quarter-window at least, so rounds are few and large."""
        window = 1 if self._careful() else self.window
        room = window - len(self.inflight)
        queue = bool(self.announcer)
        if not (self.maybe_pending or queue) or room <= 0 or (room < window // 4 and self.inflight):
            return
        s = self.session
        if queue:  # readings keep at least half the room while a re-announce is under way
            share = min(room // 2 if self.maybe_pending and room > 1 else room, DISCOVERY_WINDOW - self.announcer.in_flight)
            for item in self.announcer.take(share, self.denied):
                self._publish_other(item[0], item[1], item)
            room = window - len(self.inflight)
        rows = self.rows.pending(self.last_fed, room) if self.maybe_pending and room > 0 else []
        if len(rows) < room:
            self.maybe_pending = False
        topics, inflight, denied = self.topics, self.inflight, self.denied
        for row_id, topic, payload, retain, received_at in rows:
            if payload is None:
                self._unreadable(row_id, topic)
                continue
            if denied and topic in denied:
                continue  # stays in the outbox; read again when the topic is retried
            t = topics.get(topic)
            if t is None:
                t = topics[topic] = topic.encode()
            inflight[s.publish(t, payload, retain=bool(retain))] = (row_id, received_at, topic)
        if rows:
            self.last_fed = rows[-1][0]
        s.flush()

    def _unreadable(self, row_id, topic):
        """A damaged row: skipped for good (reported as done, so the depth falls), counted, logged."""
        self.acked.append(row_id)
        self.counts["unreadable_rows"] += 1
        if self._log_limit.allow("unreadable", time.monotonic()):
            logs.event(log, logging.ERROR, "outbox row unreadable (damaged on disk), skipped", row=row_id, topic=topic)

    def _take_acks(self, mids):
        self.memory.count(len(mids))
        now = time.time()
        inflight, acked = self.inflight, self.acked
        for mid in mids:
            entry = inflight.pop(mid, None)
            if entry is None:
                continue
            row_id, extra, _ = entry
            if row_id is not None:
                acked.append(row_id)
                self.latency.observe(max(0.0, now - extra))
            elif extra is not None:
                self.announcer.acknowledged(extra)
        if mids:
            self.maybe_pending = True  # room in the window again
            recorded = self.announcer.record()
            if recorded:
                logs.event(log, logging.INFO, "discovery published", devices=sum(1 for _, v in recorded if v),
                           cleared=sum(1 for _, v in recorded if v is None))

    # the service ------------------------------------------------------------------------------
    def _from_service(self):
        """Returns False when the service is gone (end of file): the process then ends."""
        try:
            while self.conn.poll():
                kind, *args = self.conn.recv()
                self._handle(kind, args)
        except (EOFError, OSError):
            return False
        if self.session is not None:
            try:
                self.session.flush()
            except OSError as e:
                self._lost(e)
        return True

    def _handle(self, kind, args):
        news = None
        if kind == "stop":
            self.stop_deadline = time.monotonic() + args[0]
        elif kind == "bins":
            self.bins = args[0]
        elif kind == "firmware":
            news = {dev: v for dev, v in args[0].items() if self.firmware.get(dev) != v}
            self.firmware.update(news)
        elif kind == "stats" and self.session is not None:
            self.session.publish(integrate.stats_topic(self.cfg.base_topic, self.cfg.gateway_id), args[0], qos=0)
        if (kind == "bins" or news) and self.session is not None and self.cfg.mqtt.discovery:
            self._queue_discovery(only=None if kind == "bins" else news)  # a hello: that bin alone

    def _report(self, now, force=False):
        connected = self.session is not None
        due = force or now - self.last_report >= REPORT_S or connected != self.connected_reported
        if not (due or len(self.acked) >= ACK_GROUP or (self.acked and not self.inflight)):
            return
        heartbeat = now - self.last_sent >= HEARTBEAT_S
        report = {k: v for k, v in self.counts.items() if v}
        if self.acked:
            report["acked"], self.acked = self.acked, []
        latency = self.latency.take()
        if latency:
            report["latency"] = latency
        if connected != self.connected_reported:
            report["connected"] = connected
        if report or heartbeat:
            self.conn.send(report)
            self.counts = dict.fromkeys(self.counts, 0)
            self.connected_reported = connected
            self.last_sent = now
        self.last_report = now

    def _drained(self):
        if self.inflight or self.announcer:
            return False
        try:
            if self.maybe_pending and self.rows.pending(self.last_fed, 1):
                return False
        except OutboxUnavailable:
            pass  # nothing more can be read: the stop goes on
        self.maybe_pending = False
        return True

    # loop -------------------------------------------------------------------------------------
    def run(self):
        try:
            while True:
                now = time.monotonic()
                if self.stop_deadline is not None and (self.session is None or self._drained() or now >= self.stop_deadline):
                    break
                if self.denied:
                    self._retry_denied(now)
                if self.session is None and now >= self.next_connect:
                    self._connect(now)
                if self.storage_retry and now >= self.storage_retry:
                    self.storage_retry, self.maybe_pending = 0.0, True
                if self.session is not None:
                    try:
                        self._feed()
                    except OSError as e:
                        self._lost(e)
                    except OutboxUnavailable as e:
                        self._storage_error(now, e)
                if not self._wait(now):
                    return 2  # the service is gone
                now = time.monotonic()
                self._report(now)
                if not self.inflight and not self.maybe_pending:
                    self.memory.give_back()  # a burst's rendered messages can go back to the system
                if self.session is not None:
                    try:
                        self.session.tick(now)
                    except OSError as e:  # BrokerSilent included
                        self._lost(e)
            self._say_offline()
            self._report(time.monotonic(), force=True)
            return 0
        except ServiceGone:
            return 2
        finally:
            self.announcer.record(final=True)

    def _storage_error(self, now, e):
        if self._log_limit.allow("pending", now):
            logs.event(log, logging.ERROR, "cannot read the outbox, retrying", error=str(e))
        self.maybe_pending = False
        self.storage_retry = now + 1.0  # the wake pipe does not count as news until then

    def _timeout(self, now):
        due = [now + 1.0]
        if self.acked:
            due.append(self.last_report + REPORT_S)
        if self.session is None and self.stop_deadline is None:
            due.append(self.next_connect)
        if self.session is not None and self.session.keepalive:
            due.append(self.session.next_due())
        if self.stop_deadline is not None:
            due.append(min(now + 0.05, self.stop_deadline))
        if self.storage_retry:
            due.append(self.storage_retry)
        return max(0.0, min(due) - now)

    def _wait(self, now):
        fds = [self.conn, self.wake_fd]
        if self.session is not None and self.session.pending():
            ready = [self.session]
        else:
            if self.session is not None:
                fds.append(self.session)
            ready, _, _ = select.select(fds, [], [], self._timeout(now))
        if self.wake_fd in ready:  # the service committed: it writes every row, and says so each time
            os.read(self.wake_fd, 65536)
            self.maybe_pending = not self.storage_retry
        if self.conn in ready and not self._from_service():
            return False
        if self.session is not None and self.session in ready:
            try:
                acked, received = self.session.read()
                self._take_acks(acked)
                for topic in self.session.refused:
                    self.counts["subscriptions_refused"] += 1
                    logs.event(log, logging.ERROR, "broker refused the subscription (SUBACK 0x80): check its ACL", topic=topic)
                self.session.refused.clear()
                for t, p in received:
                    if t != self.discovery_status:
                        self.announcer.retained(t, p)
                    elif p == b"online":
                        logs.event(log, logging.INFO, "Home Assistant restarted, republishing discovery")
                        self._queue_discovery(force=True)
            except OSError as e:  # ConnectionError, ProtocolError included
                self._lost(e)
        return True

    def _say_offline(self):
        """Retained "offline" acknowledged (bounded wait), then a clean disconnect: no last will."""
        if self.session is not None:
            self._take_acks(self.session.publish_and_wait(self.status_topic, "offline", retain=True, timeout=2.0))
            self.session.disconnect()
            self.session = None


def main(argv):
    conn = Connection(int(argv[0]))
    wake_fd = int(argv[1])
    # the service decides when to stop (it drains its queue first): a Ctrl-C or systemd's SIGTERM
    # to the whole group must not cut the publisher short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        kind, cfg, bins, parent_pid = conn.recv()
    except EOFError:
        return 2
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the end of file on the service's socket still ends this process
    if os.getppid() != parent_pid:  # the service died before prctl took effect
        return 2
    logs.setup(cfg.log_level)
    return Worker(conn, wake_fd, cfg, bins).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
