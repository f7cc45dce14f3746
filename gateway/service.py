"""The gateway service: inputs → pipeline → outbox, and the publisher process outbox → MQTT, under systemd.

Inputs: one reader thread per serial source and the Wi-Fi uplink subscription, all queueing
receptions. The pipeline runs on the main thread and commits what they queued in groups (one
transaction per group keeps fsyncs few at high rates), then wakes the publisher process, which
reads the outbox on its own (mqtt_publisher). sd_notify READY/STOPPING; WATCHDOG only while
every worker is alive — a dead reader thread ends the service with a non-zero code for systemd
to restart it; a dead publisher process is restarted by its monitor."""
import logging
import os
import queue
import signal
import sqlite3
import threading
import time

import sdnotify

from binlink.gateway import config as config_mod, logs, outbox_feed, outbox_spool, recovery, registry, simclock
from binlink.gateway.downlink import Answerer
from binlink.gateway.memory import Trimmer
from binlink.gateway.metrics import Metrics
from binlink.gateway.mqtt_publisher import Publisher
from binlink.gateway.outbox import Batch, Message
from binlink.gateway.storage import StorageFull
from binlink.gateway.pipeline import Pipeline
from binlink.gateway.serial_input import SerialSource
from binlink.gateway.shared_state import SharedState, status_batch
from binlink.gateway.wifi_input import WifiInput

log = logs.get("service")
MAX_GROUP = 2000  # receptions per group commit
ACK_GROUP = 5000  # broker acknowledgements written on their own once this many wait ...
# ... or no group commit took them along this long after the first arrived: a transaction of their
# own re-dirties a WAL page the last commit's fsync cleaned (4 KB on the SD card), so at a frame
# every few seconds they wait for the next one
ACK_IDLE_S = 10.0
ACKS_READY = ("publisher", [])  # queued to wake the main loop: acknowledgements to write, rows asked for
EXIT_WORKER_DIED = 3
COUNTER_END = 2**32 - 1  # a counter never wraps: there the key is used up (docs/protocol.md, Edge cases)
COUNTER_WARN = 2**31  # past half of it, a WARNING once per device: time to re-key


class Gateway:
    def __init__(self, cfg, devices=None):
        """devices: the registry as startup_problems() loaded it, or None to load it here."""
        self.cfg = cfg
        self.metrics = Metrics()
        self.shared = SharedState(cfg.redis, self.metrics, cfg.gateway_id) if cfg.redis.enabled else None
        self.devices = self._registry(registry.load_for_service(cfg.registry, self.metrics, loaded=devices))
        self.outbox_path = os.path.join(cfg.state_dir, "gateway.sqlite")
        self.queue = queue.Queue()
        self.stop_event = threading.Event()
        self.sources = [SerialSource(s, self.queue, self.metrics, self.stop_event) for s in cfg.sources]
        self.wifi = WifiInput(cfg, self.queue, self.metrics) if cfg.mqtt.uplink_topic else None
        self.publisher = Publisher(cfg, self.devices, self.metrics, on_news=lambda: self.queue.put(ACKS_READY))
        self._acks_due = 0.0  # when acknowledgements no group commit took along are written on their own
        self._memory = Trimmer()
        self._log_limit = logs.RateLimit(per_minute=2)
        self.notifier = sdnotify.SystemdNotifier()
        self._metrics_server = None
        self._reload = False
        self._counters_warned = set()  # devices whose counter passed COUNTER_WARN, said once
        self.answerer = None  # downlink.Answerer, once the state is open

    def _registry(self, local):
        """The file's registry, merged with the fleet's when several gateways share state."""
        return local if self.shared is None else self.shared.merge(local)

    def request_stop(self, *_):
        self.stop_event.set()

    def request_reload(self, *_):
        self._reload = True

    def _reload_registry(self, pipeline):
        """SIGHUP (systemctl reload): a bin just provisioned is known without a restart. A broken
        registry is reported and the one in use is kept."""
        self._reload = False
        try:
            devices = self._registry(registry.load_for_service(self.cfg.registry, self.metrics))
        except config_mod.ConfigError as e:
            for problem in e.problems:
                logs.event(log, logging.ERROR, "registry not reloaded", problem=problem)
            return
        added = len(set(devices) - set(self.devices))
        self.devices = devices
        pipeline.set_devices(devices)
        self.publisher.set_devices(devices)
        self.answerer.publish_settings(pipeline.outbox, pipeline.devices.values())  # `registry set` shows at once
        logs.event(log, logging.INFO, "registry reloaded", devices=len(devices), added=added)

    def _dead_workers(self):
        dead = [s.name for s in self.sources if not s.is_alive()]
        if not self.publisher.alive():
            dead.append("publisher")
        return dead

    def run(self):
        cfg = self.cfg
        if cfg.metrics_listen:  # first: state problems found at start show there too
            host, port = config_mod.metrics_address(cfg)
            try:
                self._metrics_server = self.metrics.serve(host, port)
            except OSError as e:
                raise config_mod.ConfigError(["metrics.listen: cannot listen on %s: %s" % (cfg.metrics_listen, e.strerror or e)]) from None
        try:
            os.makedirs(cfg.state_dir, exist_ok=True)
            # checked and repaired, counters raised from the broker, before any frame is accepted
            box, state = recovery.open_state(cfg, self.outbox_path, self.devices, self.metrics, self.stop_event,
                                             keepalive=lambda: self.notifier.notify("EXTEND_TIMEOUT_USEC=30000000"))
        except (OSError, sqlite3.Error) as e:
            raise config_mod.ConfigError(["gateway.state_dir: cannot open %s: %s" % (self.outbox_path, e)]) from None
        box.on_rows = self.publisher.notify  # every commit that stores rows, whoever makes it, wakes the publisher
        pipeline = Pipeline(cfg, self.devices, box, self.metrics, shared=self.shared, clock=simclock.from_env(log))
        pipeline.clock_check.broker_time = state.newest_synced_time
        pipeline.clock_check.plausible(time.time())  # said at start, not only with the first frame
        self.publisher.firmware = dict(pipeline.firmware)  # sw_version in discovery; a new version republishes
        pipeline.on_new_firmware = self.publisher.set_firmware
        self.answerer = Answerer(cfg, self.metrics, self.sources, cfg.state_dir, clock=pipeline.clock, wifi=self.wifi)
        self.answerer.publish_settings(box, pipeline.devices.values())  # desired vs reported, where it changed
        self._take_spool(box)  # what `registry retire` queued while the gateway was stopped
        depth = box.depth()
        logs.event(log, logging.INFO, "gateway starting", gateway=cfg.gateway_id, site=cfg.site, devices=len(self.devices),
                   sources=len(self.sources), outbox_depth=depth, base_topic=cfg.base_topic)
        self.metrics.outbox_depth.set(depth)
        self.publisher.start()  # drains what a previous run left in the outbox first
        for s in self.sources:
            s.start()
        if self.wifi is not None:
            self.wifi.start()
        self.notifier.notify("READY=1")
        code = 0
        last_stats = last_prune = last_poll = spool_at = time.monotonic()
        shared_shown = None
        while not self.stop_event.is_set():
            if self.shared is not None and time.monotonic() - last_poll >= cfg.redis.registry_poll_s:
                last_poll = time.monotonic()  # a bin provisioned at another gateway, known here too
                self._reload = self.shared.registry_changed() or self._reload
            if self._reload:
                self._reload_registry(pipeline)
            self._process(pipeline, timeout=0.5)
            self._serve_rows(box)
            if pipeline.standby and self.queue.empty():
                pipeline.process([])  # peers' pending claims come due even when no radio speaks
            if self.shared is not None and self.shared.up != shared_shown:
                shared_shown = self.shared.up  # said on MQTT too: retained gateway/<id>/shared_state
                self.metrics.outbox_depth.inc(box.commit(status_batch(cfg, shared_shown)))
            now = time.monotonic()
            if now >= spool_at:
                spool_at = now + 1.0
                self._take_spool(box)
            self._write_acks(box, pipeline.storage, now)
            dead = self._dead_workers()
            if dead and not self.stop_event.is_set():  # stopping, the readers end by themselves
                logs.event(log, logging.ERROR, "worker died, stopping for systemd to restart the service", workers=",".join(dead))
                code = EXIT_WORKER_DIED
                break
            self.notifier.notify("WATCHDOG=1")
            if now - last_stats >= cfg.status_interval_s:
                last_stats = now
                counter_headroom(pipeline.counters, self.devices, self.metrics, self._counters_warned)
                self.publisher.publish_stats(self.metrics.snapshot())
            if now - last_prune >= 3600:
                last_prune = now
                box.prune()
        self.stop_event.set()
        self.notifier.notify("STOPPING=1")
        logs.event(log, logging.INFO, "stopping: draining queue and outbox")
        if self.wifi is not None:
            self.wifi.stop()
        for s in self.sources:
            s.join(2)
        while not self.queue.empty():
            self._process(pipeline, timeout=0)
        self.publisher.stop(serve=lambda: self._serve_rows(box))
        self._write_acks(box, pipeline.storage, time.monotonic(), force=True)
        remaining = box.depth()
        pipeline.close()
        self.answerer.close()
        box.close()
        if self._metrics_server is not None:
            self._metrics_server[0].shutdown()
        logs.event(log, logging.INFO, "gateway stopped", outbox_depth=remaining, exit_code=code)
        return code

    def _process(self, pipeline, timeout):
        """One group commit of what the inputs queued: (source, [receptions]) per read."""
        try:
            chunks = [self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait()]
        except queue.Empty:
            return
        n = len(chunks[0][1])
        while n < MAX_GROUP:
            try:
                chunks.append(self.queue.get_nowait())
            except queue.Empty:
                break
            n += len(chunks[-1][1])
        items = [(source, rec) for source, recs in chunks for rec in recs]
        if items:
            pipeline.process(items)
            if pipeline.listening:  # committed: answered now, in the bin's receive window (downlink.py)
                self.answerer.after_commit(pipeline)
        self._memory.count(len(items))
        if self.queue.empty():
            self._memory.give_back()

    def _serve_rows(self, box):
        """The publisher's requests for outbox rows, answered between group commits (outbox_feed.py)."""
        self.publisher.answer_asks(lambda request: outbox_feed.answer(box, request))

    def _take_spool(self, box):
        """Clearing messages `binlink registry retire` queued (outbox_spool.py), committed and said
        to the publisher; a bad spool file is set aside, a failed commit tried again next second."""
        for path in outbox_spool.pending(self.cfg.state_dir):
            try:
                at, messages = outbox_spool.read(path)
            except ValueError as e:
                logs.event(log, logging.ERROR, "spool file refused and set aside", path=path, problem=str(e))
                self._spool_done(outbox_spool.reject, path)
                continue
            batch = Batch()
            for key, topic in messages:
                batch.states[topic] = Message(key, topic, "", True, at)
            try:
                self.metrics.outbox_depth.inc(box.commit(batch))
            except (StorageFull, sqlite3.Error) as e:
                logs.event(log, logging.ERROR, "cannot take in a spool file, trying again", path=path, error=str(e))
                return
            self._spool_done(outbox_spool.done, path)
            logs.event(log, logging.INFO, "queued messages taken in", path=path, messages=len(messages))

    def _spool_done(self, finish, path):
        try:
            finish(path)
        except OSError as e:  # taken in again next time: the same empty retained messages, harmless
            if self._log_limit.allow("spool", time.monotonic()):
                logs.event(log, logging.ERROR, "cannot remove a spool file", path=path, error=str(e))

    def _write_acks(self, box, guard, now, force=False):
        """The broker's acknowledgements, reported by the publisher process, into the outbox: this
        thread is the outbox's only writer. They ride with the next group commit; on their own only
        when none comes soon. A power cut before they are written means those messages are
        published again, under the same ids."""
        fresh = self.publisher.take_acks()
        if fresh:
            if not box.acks_waiting:
                self._acks_due = now + ACK_IDLE_S
            try:
                self.metrics.outbox_depth.dec(box.defer_acks(fresh))
            except sqlite3.Error as e:  # a read; the ids are kept all the same
                logs.event(log, logging.ERROR, "cannot count acknowledged messages", error=str(e))
            self.metrics.published.inc(len(fresh))
        waiting = box.acks_waiting
        self.metrics.acks_unwritten.set(waiting)
        if not waiting or not (force or waiting >= ACK_GROUP or now >= self._acks_due):
            return
        try:
            box.write_acks()
            self.metrics.acks_unwritten.set(0)
            guard.ok()
        except StorageFull as e:  # kept and written once there is room; not published again meanwhile
            guard.acks_kept(e, waiting)
            self._acks_due = now + 1.0
            return
        except (sqlite3.Error, OSError) as e:  # kept, tried again: the messages are published already
            if self._log_limit.allow("ack", now):
                logs.event(log, logging.ERROR, "cannot record acknowledgements in the outbox", error=str(e), waiting=waiting)
            self._acks_due = now + 1.0


def counter_headroom(counters, devices, metrics, warned):
    """binlink_counter_headroom_min from counters (device_id -> last accepted fcnt); a WARNING once
    per device (warned: those said already) whose counter passed COUNTER_WARN."""
    metrics.counter_headroom.set(COUNTER_END - max(counters.values(), default=0))
    for dev, fcnt in counters.items():
        if fcnt >= COUNTER_WARN and dev not in warned:
            warned.add(dev)
            bin_id = devices[dev].bin_id if dev in devices else "?"
            logs.event(log, logging.WARNING, "frame counter past 2^31: re-key the bin before it reaches 2^32-1 "
                       "(binlink registry rekey %s)" % bin_id, device="%06x" % dev, bin=bin_id, fcnt=fcnt,
                       left=COUNTER_END - fcnt)


def startup_problems(cfg):
    """Every file the gateway opens, opened: (problems naming key and file, devices or None).
    `check-config` and the service's start say the same things."""
    problems = config_mod.check_files(cfg)
    devices = None
    try:
        devices = registry.load(cfg.registry, strict=False)  # a bad entry costs its bin, not the site
    except config_mod.ConfigError as e:
        problems = ["gateway.registry: %s" % p for p in e.problems] + problems
    return problems, devices


def run(config_path):
    """Raises ConfigError (one line per problem, naming the key and the file) for anything that
    stops the gateway from starting."""
    cfg = config_mod.load(config_path)
    problems, devices = startup_problems(cfg)
    if problems:
        raise config_mod.ConfigError(problems)
    logs.setup(cfg.log_level)
    gw = Gateway(cfg, devices)  # the registry read once: 10,000 bins take a second to parse on a Pi
    del devices
    signal.signal(signal.SIGTERM, gw.request_stop)
    signal.signal(signal.SIGINT, gw.request_stop)
    signal.signal(signal.SIGHUP, gw.request_reload)
    return gw.run()
