"""Publish stage, in its own process: drains the durable outbox (SQLite WAL) to the broker, QoS 1.

Why a process: publishing cost most of the CPU per frame and shared one GIL with ingest; apart,
ingest commits as before (synchronous=FULL, in the service process) and this process reads what
was committed. A message leaves the outbox only when the broker's PUBACK for it arrives. After a
reconnect or a restart, everything not acknowledged is sent again from the outbox, in order, with
the same message ids in its payloads (consumers deduplicate by them).

The service talks to the process over a socket pair (multiprocessing.connection: start, devices,
stats, stop) and wakes it after each group commit through a pipe; the process reports back the
outbox ids the broker acknowledged and its counts. The service writes those acknowledgements
into the outbox between its group commits: one writer, so ingest never waits on SQLite's lock
for the publisher (a busy wait there sleeps 1, 2, 5, 10... ms and stalled both sides). It dies with the service: PR_SET_PDEATHSIG, and it exits on end of file from the
service's end. Publisher.start/stop/... run in the service; Worker runs in the child."""
import ctypes
import json
import logging
import os
import select
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

from binlink.gateway import config as config_mod, homeassistant, integrate, logs, mqtt_wire
from binlink.gateway.latency import LatencyCounts
from binlink.gateway.memory import Trimmer
from binlink.gateway.outbox import Outbox

log = logs.get("mqtt")
ACK_GROUP = 2000  # acknowledgements reported at once when this many are waiting ...
REPORT_S = 0.05  # ... else at most this often, and at once when nothing is left in flight
RECONNECT_MIN_S, RECONNECT_MAX_S = 1.0, 30.0
RESTART_MAX_S = 30.0
HEARTBEAT_S = 5.0  # the process reports at least this often, news or not ...
SILENT_LIMIT_S = 60.0  # ... and one silent for this long counts as dead for the watchdog
LOOK_S = 2.0  # the outbox is also read this often unwoken: rows other writers left (`binlink registry retire`)
PR_SET_PDEATHSIG = 1


class Publisher:
    """The service's handle on the publisher process: starts it, restarts it if it dies,
    applies its reports to the service's metrics."""

    def __init__(self, cfg, outbox_path, devices, metrics, on_acks=lambda: None):
        """on_acks(): called (monitor thread) when acknowledgements arrive and none were waiting."""
        self.cfg = cfg
        self.outbox_path = outbox_path
        self.devices = devices
        self.firmware = {}  # device hex -> firmware version from its hello (sw_version in discovery)
        self.metrics = metrics
        self.proc = None
        self._conn = None
        self._wake_w = None
        self._stopping = threading.Event()
        self._acked = []  # outbox ids acknowledged by the broker, for the service to write
        self._last_heard = time.monotonic()
        self._on_acks = on_acks
        self._lock = threading.Lock()  # sends to the process come from the main and the monitor thread
        self._monitor = threading.Thread(target=self._watch, name="publisher-monitor", daemon=True)

    def start(self):
        self._spawn()
        self._monitor.start()

    def _spawn(self):
        ours, theirs = socket.socketpair()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)  # a full pipe means the process is awake anyway
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "binlink.gateway.mqtt_publisher", str(theirs.fileno()), str(wake_r)],
            pass_fds=(theirs.fileno(), wake_r), stdin=subprocess.DEVNULL)
        theirs.close()
        os.close(wake_r)
        self._last_heard = time.monotonic()
        with self._lock:
            if self._wake_w is not None:
                os.close(self._wake_w)
            self._conn = Connection(ours.detach())
            self._wake_w = wake_w
            self._conn.send(("start", self.cfg, self.outbox_path, self.devices, os.getpid()))
            self._conn.send(("firmware", dict(self.firmware)))

    def _watch(self):
        """Reports from the process; its death (end of file) is logged, counted and repaired."""
        backoff = RECONNECT_MIN_S
        while True:
            started = time.monotonic()
            try:
                while True:
                    report = self._conn.recv()
                    self._last_heard = time.monotonic()
                    acked = report.pop("acked", None)
                    if acked:
                        with self._lock:
                            was_empty = not self._acked
                            self._acked += acked
                        if was_empty:
                            self._on_acks()
                    self.metrics.apply_publisher_report(report)
            except (EOFError, OSError):
                pass
            code = self.proc.wait()
            self.metrics.mqtt_connected.set(0)
            if self._stopping.is_set():
                return
            logs.event(log, logging.ERROR, "publisher process exited, restarting it", exit_code=code, retry_s=backoff)
            self.metrics.publisher_restarts.inc()
            if self._stopping.wait(backoff):
                return
            backoff = RECONNECT_MIN_S if time.monotonic() - started > 60 else min(RESTART_MAX_S, backoff * 2)
            self._spawn()

    def take_acks(self):
        """Outbox ids the broker acknowledged since the last call (the service writes them)."""
        with self._lock:
            acked, self._acked = self._acked, []
        return acked

    def alive(self):
        """The watchdog's question: False when the process is gone and not being restarted, or
        stuck (no report for SILENT_LIMIT_S; it reports every HEARTBEAT_S)."""
        return self._monitor.is_alive() and time.monotonic() - self._last_heard < SILENT_LIMIT_S

    def _send(self, message):
        with self._lock:
            try:
                self._conn.send(message)
            except OSError:
                pass  # the process is gone; the monitor restarts it with the current devices

    def notify(self):
        """After a group commit: there is something new in the outbox."""
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, BrokenPipeError):
            pass

    def set_devices(self, devices):
        """A reloaded registry: discovery is published for what changed (new, changed, retired bins)."""
        self.devices = devices
        self._send(("devices", devices))

    def set_firmware(self, device_hex, version):
        """A hello brought a firmware version not seen before: the bin's discovery says so."""
        self.firmware[device_hex] = version
        self._send(("firmware", {device_hex: version}))

    def publish_stats(self, stats):
        self._send(("stats", json.dumps(stats, sort_keys=True)))

    def stop(self, drain_timeout_s=10.0):
        """Waits (bounded) for the outbox to drain, says offline, disconnects."""
        self._stopping.set()
        if time.monotonic() - self._last_heard >= SILENT_LIMIT_S:  # stuck: it would not answer
            self.proc.kill()
        self._send(("stop", drain_timeout_s))
        try:
            self.proc.wait(drain_timeout_s + 5)
        except subprocess.TimeoutExpired:
            logs.event(log, logging.WARNING, "publisher process did not stop in time, killed")
            self.proc.kill()
        self._monitor.join(5)


class Worker:
    """The publisher process's loop: one thread, select() over the broker, the service and the wake pipe."""

    def __init__(self, conn, wake_fd, cfg, outbox_path, devices):
        self.conn = conn
        self.wake_fd = wake_fd
        self.cfg = cfg
        self.devices = devices
        self.firmware = {}
        # what discovery was published, kept across restarts: at 10,000 bins a reconnect must not
        # queue 50,000 retained configs when nothing changed (only changes, or all on HA's restart)
        self.discovery = homeassistant.Discovery(os.path.join(cfg.state_dir, "discovery.json"), cfg.mqtt.discovery_prefix,
                                                 cfg.base_topic, cfg.site)
        self.box = Outbox(outbox_path, durable=False)
        self.status_topic = integrate.status_topic(cfg.base_topic, cfg.gateway_id)
        self.discovery_status = "%s/status" % cfg.mqtt.discovery_prefix
        self.window = cfg.mqtt.max_inflight
        self.tls = None
        if cfg.mqtt.tls:
            m = cfg.mqtt
            self.tls = mqtt_wire.tls_context(m.ca_file, m.cert_file, m.key_file)
        self.password = config_mod.mqtt_password(cfg.mqtt)
        self.session = None
        self.inflight = {}  # mid -> (outbox id, received_at); (None, None) for discovery and status
        self.last_fed = 0  # highest outbox id handed to the broker in this session
        self.maybe_pending = True  # the outbox may hold rows after last_fed
        self.next_look = 0.0
        self.acked = []  # outbox ids the broker acknowledged, not yet reported to the service
        self.next_connect = 0.0
        self.backoff = RECONNECT_MIN_S
        self.stop_deadline = None
        self.storage_retry = 0.0
        self.topics = {}  # topic str -> bytes: a few hundred bins, encoded once
        self._log_limit = logs.RateLimit(per_minute=1)
        self.latency = LatencyCounts()
        self.memory = Trimmer()
        self.counts = {"connect_failures": 0, "unreadable_rows": 0}
        self.connected_reported = None
        self.last_report = self.last_sent = 0.0

    # connection -------------------------------------------------------------------------------
    def _connect(self, now):
        m = self.cfg.mqtt
        try:
            s = mqtt_wire.Session(m.host, m.port, self.cfg.client_id, keepalive=m.keepalive, username=m.username,
                                  password=self.password, will=(self.status_topic, "offline", True), tls=self.tls)
        except mqtt_wire.Refused as e:
            self._connect_failed(now, "broker refused connection", reason=str(e))
            return
        except (OSError, ssl.SSLError, ConnectionError) as e:
            self._connect_failed(now, "cannot reach broker", error=str(e) or type(e).__name__)
            return
        logs.event(log, logging.INFO, "connected to broker", host=m.host, port=m.port)
        self.session, self.backoff = s, RECONNECT_MIN_S
        self.inflight, self.last_fed, self.maybe_pending = {}, 0, True  # resend all unacknowledged, in order
        self.inflight[s.publish(self.status_topic, "online", retain=True)] = (None, None)
        if m.discovery:
            s.subscribe(self.discovery_status)
            self._publish_discovery()
        s.flush()

    def _connect_failed(self, now, msg, **fields):
        self.counts["connect_failures"] += 1
        m = self.cfg.mqtt
        if self._log_limit.allow(msg, time.monotonic()):
            logs.event(log, logging.ERROR, msg, host=m.host, port=m.port, retry_s=self.backoff, **fields)
        self.next_connect = now + self.backoff
        self.backoff = min(RECONNECT_MAX_S, self.backoff * 2)

    def _lost(self, e):
        if self.stop_deadline is None:
            logs.event(log, logging.WARNING, "broker connection lost, reconnecting", error=str(e) or type(e).__name__)
        self.session.close()
        self.session = None
        self.next_connect = time.monotonic() + RECONNECT_MIN_S

    def _publish_discovery(self, force=False):
        sent = self.discovery.changes(self.devices, self.firmware, force=force)
        for topic, payload in sent:
            self.inflight[self.session.publish(topic, payload, retain=True)] = (None, None)
        if sent:
            self.discovery.mark(sent)
        logs.event(log, logging.INFO, "discovery published" if sent else "discovery unchanged",
                   configs=sum(1 for _, p in sent if p), cleared=sum(1 for _, p in sent if not p))

    # outbox -----------------------------------------------------------------------------------
    def _feed(self):
        """Hands the broker what the window has room for; a quarter-window at least, so rounds are few and large."""
        room = self.window - len(self.inflight)
        if not self.maybe_pending or room <= 0 or (room < self.window // 4 and self.inflight):
            return
        rows = self.box.pending(self.last_fed, room)
        if len(rows) < room:
            self.maybe_pending = False
        s, topics, inflight = self.session, self.topics, self.inflight
        for row_id, topic, payload, retain, received_at in rows:
            if payload is None:
                self._unreadable(row_id, topic)
                continue
            t = topics.get(topic)
            if t is None:
                t = topics[topic] = topic.encode()
            inflight[s.publish(t, payload, retain=bool(retain))] = (row_id, received_at)
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
        for mid in mids:
            row_id, received_at = self.inflight.pop(mid, (None, None))
            if row_id is not None:
                self.acked.append(row_id)
                self.latency.observe(max(0.0, now - received_at))
        if mids:
            self.maybe_pending = True  # room in the window again

    # the service ------------------------------------------------------------------------------
    def _from_service(self):
        """Returns False when the service is gone (end of file): the process then ends."""
        try:
            while self.conn.poll():
                kind, *args = self.conn.recv()
                if kind == "stop":
                    self.stop_deadline = time.monotonic() + args[0]
                elif kind in ("devices", "firmware"):
                    if kind == "devices":
                        self.devices = args[0]
                    else:
                        self.firmware.update(args[0])
                    if self.session is not None and self.cfg.mqtt.discovery:
                        self._publish_discovery()
                elif kind == "stats" and self.session is not None:
                    self.session.publish(integrate.stats_topic(self.cfg.base_topic, self.cfg.gateway_id), args[0], qos=0)
        except (EOFError, OSError):
            return False
        if self.session is not None:
            try:
                self.session.flush()
            except OSError as e:
                self._lost(e)
        return True

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

    def _idle(self):
        """Nothing in flight and nothing new: a burst's rendered messages can go back to the system."""
        if not self.inflight and not self.maybe_pending:
            self.memory.give_back()

    def _drained(self):
        if self.inflight:
            return False
        if self.maybe_pending and self.box.pending(self.last_fed, 1):
            return False
        self.maybe_pending = False
        return True

    # loop -------------------------------------------------------------------------------------
    def run(self):
        try:
            while True:
                now = time.monotonic()
                if self.stop_deadline is not None and (self.session is None or self._drained() or now >= self.stop_deadline):
                    break
                if self.session is None and now >= self.next_connect:
                    self._connect(now)
                if self.storage_retry and now >= self.storage_retry:
                    self.storage_retry, self.maybe_pending = 0.0, True
                if self.session is not None:
                    try:
                        self._feed()
                    except OSError as e:
                        self._lost(e)
                    except sqlite3.Error as e:
                        self._storage_error(now, e)
                if not self._wait(now):
                    return 2  # the service is gone
                now = time.monotonic()
                self._report(now)
                self._idle()
                if self.session is not None:
                    try:
                        self.session.ping_if_due(now)
                    except OSError as e:
                        self._lost(e)
            self._say_offline()
            self._report(time.monotonic(), force=True)
            return 0
        finally:
            self.box.close()

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
        if self.stop_deadline is not None:
            due.append(min(now + 0.05, self.stop_deadline))
        if self.storage_retry:
            due.append(self.storage_retry)
        return max(0.0, min(due) - now)

    def _wait(self, now):
        fds = [self.conn, self.wake_fd]
        if self.session is not None:
            if self.session.pending():
                ready = [self.session]
            else:
                fds.append(self.session)
                ready, _, _ = select.select(fds, [], [], self._timeout(now))
        else:
            ready, _, _ = select.select(fds, [], [], self._timeout(now))
        if self.wake_fd in ready:
            os.read(self.wake_fd, 65536)
            self.maybe_pending = not self.storage_retry
        elif time.monotonic() >= self.next_look and not self.storage_retry:
            self.maybe_pending = True
        if self.maybe_pending:
            self.next_look = time.monotonic() + LOOK_S
        if self.conn in ready and not self._from_service():
            return False
        if self.session is not None and self.session in ready:
            try:
                acked, received = self.session.read()
            except (OSError, ConnectionError) as e:
                self._lost(e)
                return True
            self._take_acks(acked)
            if any(t == self.discovery_status and p == b"online" for t, p in received):
                logs.event(log, logging.INFO, "Home Assistant restarted, republishing discovery")
                self._publish_discovery(force=True)
                try:
                    self.session.flush()
                except OSError as e:
                    self._lost(e)
        return True

    def _say_offline(self):
        """Retained "offline" acknowledged (bounded wait), then a clean disconnect: no last will."""
        s = self.session
        if s is None:
            return
        try:
            mid = s.publish(self.status_topic, "offline", retain=True)
            s.flush()
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                ready, _, _ = select.select([s], [], [], max(0.0, deadline - time.monotonic()))
                if ready or s.pending():
                    acked, _ = s.read()
                    self._take_acks(acked)
                    if mid in acked:
                        break
        except (OSError, ConnectionError):
            pass
        s.disconnect()
        self.session = None


def _die_with_parent(parent_pid):
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the end of file on the service's socket still ends this process
    if os.getppid() != parent_pid:  # the service died before prctl took effect
        sys.exit(2)


def main(argv):
    conn = Connection(int(argv[0]))
    wake_fd = int(argv[1])
    # the service decides when to stop (it drains its queue first): a Ctrl-C or systemd's SIGTERM
    # to the whole group must not cut the publisher short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        kind, cfg, outbox_path, devices, parent_pid = conn.recv()
    except EOFError:
        return 2
    _die_with_parent(parent_pid)
    logs.setup(cfg.log_level)
    return Worker(conn, wake_fd, cfg, outbox_path, devices).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
