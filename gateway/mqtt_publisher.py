"""Publish stage, in its own process: drains the durable outbox (SQLite WAL) to the broker, QoS 1.
This module is the service's side (Publisher: starts the process, restarts it, applies its
reports); the process's loop is publisher_worker.Worker.

Why a process: publishing cost most of the CPU per frame and shared one GIL with ingest; apart,
ingest commits as before (synchronous=FULL, in the service process) and this process asks the
service for what was committed (outbox_feed.py: the service holds the file alone). A message
leaves the outbox only when the broker's PUBACK for it arrives. After a
reconnect or a restart, everything not acknowledged is sent again from the outbox, in order, with
the same message ids in its payloads (consumers deduplicate by them).

The service talks to the process over a socket pair (multiprocessing.connection: start, bins,
firmware, stats, stop, rows asked for) and wakes it after each commit that stored rows through a
pipe; the process reports back the outbox ids the broker acknowledged and its counts. The service writes those
acknowledgements into the outbox between its group commits: one writer, so ingest never waits on
SQLite's lock for the publisher (a busy wait there sleeps 1, 2, 5, 10... ms and stalled both
sides). The process gets bin metadata (homeassistant.BinInfo), never the registry's devices: they
carry keys. It dies with the service: PR_SET_PDEATHSIG, and it exits on end of file from the
service's end."""
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

from binlink.gateway import homeassistant, logs
from binlink.gateway.publish_policy import Backoff

log = logs.get("mqtt")
RESTART_MIN_S, RESTART_MAX_S = 1.0, 30.0
RESTART_GOOD_S = 60.0  # a process that lived this long (or reached the broker) restarts from the floor again
SILENT_LIMIT_S = 60.0  # a process silent this long counts as dead for the watchdog (it reports every 5 s)


class Publisher:
    """The service's handle on the publisher process: starts it, restarts it if it dies,
    applies its reports to the service's metrics."""

    def __init__(self, cfg, devices, metrics, on_news=lambda: None):
        """on_news(): called (monitor thread) when acknowledgements arrive and none were waiting, or
        the process asks for outbox rows: the service's main loop has something to do."""
        self.cfg = cfg
        self.bins = homeassistant.bin_infos(devices)
        self.firmware = {}  # device hex -> firmware version from its hello (sw_version in discovery)
        self.metrics = metrics
        self.proc = None
        self._conn = None
        self._wake_w = None
        self._wake_lock = threading.Lock()  # notify() (main thread) never writes to a pipe being swapped
        self._stopping = threading.Event()
        self._acked = []  # outbox ids acknowledged by the broker, for the service to write
        self._asks = []  # the process's requests for outbox rows, for the service to answer (outbox_feed.py)
        self._last_heard = time.monotonic()
        self._on_news = on_news
        self._lock = threading.Lock()  # sends to the process come from the main and the monitor thread
        self._restart = Backoff(RESTART_MIN_S, RESTART_MAX_S, RESTART_GOOD_S)
        self._monitor = threading.Thread(target=self._watch, name="publisher-monitor", daemon=True)

    def start(self):
        self._spawn()
        self._monitor.start()

    def start_message(self):
        """The process's first message: configuration, bins (no keys), the service's pid."""
        return ("start", self.cfg, self.bins, os.getpid())

    def _spawn(self):
        ours, theirs = socket.socketpair()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)  # a full pipe means the process is awake anyway
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "binlink.gateway.publisher_worker", str(theirs.fileno()), str(wake_r)],
            pass_fds=(theirs.fileno(), wake_r), stdin=subprocess.DEVNULL)
        theirs.close()
        os.close(wake_r)
        self._last_heard = time.monotonic()
        self._swap_wake(wake_w)
        with self._lock:
            self._conn = Connection(ours.detach())
            self._conn.send(self.start_message())
            self._conn.send(("firmware", dict(self.firmware)))

    def _swap_wake(self, wake_w):
        with self._wake_lock:
            old, self._wake_w = self._wake_w, wake_w
            if old is not None:
                os.close(old)

    def _watch(self):
        """Reports from the process; its death (end of file) is logged, counted and repaired."""
        while True:
            started, reached_broker = time.monotonic(), False
            try:
                while True:
                    report = self._conn.recv()
                    self._last_heard = time.monotonic()
                    if isinstance(report, tuple):  # ("pending", number, after, limit)
                        with self._lock:
                            self._asks.append(report[1:])
                        self._on_news()
                        continue
                    reached_broker = reached_broker or bool(report.get("connected"))
                    acked = report.pop("acked", None)
                    if acked:
                        with self._lock:
                            was_empty = not self._acked
                            self._acked += acked
                        if was_empty:
                            self._on_news()
                    self.metrics.apply_publisher_report(report)
            except (EOFError, OSError):
                pass
            code = self.proc.wait()
            self.metrics.mqtt_connected.set(0)
            if self._stopping.is_set():
                return
            self._restart.ran(RESTART_GOOD_S if reached_broker else time.monotonic() - started)
            delay = self._restart.next_delay()
            logs.event(log, logging.ERROR, "publisher process exited, restarting it", exit_code=code, retry_s=round(delay, 1))
            self.metrics.publisher_restarts.inc()
            if self._stopping.wait(delay):
                return
            self._spawn()

    def take_acks(self):
        """Outbox ids the broker acknowledged since the last call (the service writes them)."""
        with self._lock:
            acked, self._acked = self._acked, []
        return acked

    def answer_asks(self, answer):
        """Sends answer(request) for each request for rows the process made since the last call."""
        with self._lock:
            asks, self._asks = self._asks, []
        for request in asks:
            self._send(answer(request))

    def alive(self):
        """The watchdog's question: False when the process is gone and not being restarted, or
        stuck (no report for SILENT_LIMIT_S; it reports every few seconds)."""
        return self._monitor.is_alive() and time.monotonic() - self._last_heard < SILENT_LIMIT_S

    def _send(self, message):
        with self._lock:
            try:
                self._conn.send(message)
            except OSError:
                pass  # the process is gone; the monitor restarts it with the current bins

    def notify(self):
        """After a group commit: there is something new in the outbox. Never raises: a full pipe
        means the process is awake anyway, and a closed one that it is being restarted."""
        with self._wake_lock:
            if self._wake_w is None:
                return
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass

    def set_devices(self, devices):
        """A reloaded registry: discovery is published for what changed (new, changed, retired bins)."""
        self.bins = homeassistant.bin_infos(devices)
        self._send(("bins", self.bins))

    def set_firmware(self, device_hex, version):
        """A hello brought a firmware version not seen before: the bin's discovery says so."""
        self.firmware[device_hex] = version
        self._send(("firmware", {device_hex: version}))

    def publish_stats(self, stats):
        self._send(("stats", json.dumps(stats, sort_keys=True)))

    def stop(self, drain_timeout_s=10.0, serve=lambda: None):
        """Waits (bounded) for the outbox to drain, says offline, disconnects. serve(): answers the
        process's requests for rows meanwhile (the caller holds the outbox)."""
        self._stopping.set()
        if time.monotonic() - self._last_heard >= SILENT_LIMIT_S:  # stuck: it would not answer
            self.proc.kill()
        self._send(("stop", drain_timeout_s))
        try:
            deadline = time.monotonic() + drain_timeout_s + 5
            while self.proc.poll() is None:
                if time.monotonic() >= deadline:
                    raise subprocess.TimeoutExpired(self.proc.args, drain_timeout_s + 5)
                serve()
                time.sleep(0.005)
        except subprocess.TimeoutExpired:
            logs.event(log, logging.WARNING, "publisher process did not stop in time, killed")
            self.proc.kill()
        self._monitor.join(5)
        self._swap_wake(None)
