"""The gateway service: serial sources → pipeline → outbox → MQTT, under systemd.

Threads: one reader per serial source, paho's network loop and the outbox feeder; the pipeline
runs on the main thread and commits what the readers queued in groups (one transaction per
group keeps fsyncs few at high rates). sd_notify READY/WATCHDOG/STOPPING when under systemd."""
import logging
import os
import queue
import signal
import threading
import time

import sdnotify

from binlink.gateway import config as config_mod, logs, registry
from binlink.gateway.metrics import Metrics
from binlink.gateway.module_formats import Reception
from binlink.gateway.mqtt_publisher import Publisher
from binlink.gateway.outbox import Outbox
from binlink.gateway.pipeline import Pipeline
from binlink.gateway.serial_input import SerialSource

log = logs.get("service")
MAX_GROUP = 2000  # receptions per group commit


class Gateway:
    def __init__(self, cfg):
        self.cfg = cfg
        self.devices = registry.load(cfg.registry)
        self.metrics = Metrics()
        os.makedirs(cfg.state_dir, exist_ok=True)
        self.outbox_path = os.path.join(cfg.state_dir, "gateway.sqlite")
        self.queue = queue.Queue()
        self.stop_event = threading.Event()
        self.sources = [SerialSource(s, self.queue, self.metrics, self.stop_event) for s in cfg.sources]
        self.publisher = Publisher(cfg, self.outbox_path, self.devices, self.metrics,
                                   on_uplink=lambda frame: self.queue.put(("mqtt", [Reception(frame)])))
        self.notifier = sdnotify.SystemdNotifier()
        self._metrics_server = None
        self._reload = False

    def request_stop(self, *_):
        self.stop_event.set()

    def request_reload(self, *_):
        self._reload = True

    def _reload_registry(self, pipeline):
        """SIGHUP (systemctl reload): a bin just provisioned is known without a restart. A broken
        registry is reported and the one in use is kept."""
        self._reload = False
        try:
            devices = registry.load(self.cfg.registry)
        except config_mod.ConfigError as e:
            for problem in e.problems:
                logs.event(log, logging.ERROR, "registry not reloaded", problem=problem)
            return
        added = len(set(devices) - set(self.devices))
        self.devices = self.publisher.devices = devices
        pipeline.set_devices(devices)
        logs.event(log, logging.INFO, "registry reloaded", devices=len(devices), added=added)
        self.publisher.request_discovery()

    def run(self):
        cfg = self.cfg
        box = Outbox(self.outbox_path)
        pipeline = Pipeline(cfg, self.devices, box, self.metrics)
        self.publisher.firmware = pipeline.firmware  # sw_version in discovery; a new version republishes
        pipeline.on_new_firmware = self.publisher.request_discovery
        depth = box.depth()
        logs.event(log, logging.INFO, "gateway starting", gateway=cfg.gateway_id, site=cfg.site, devices=len(self.devices),
                   sources=len(self.sources), outbox_depth=depth, base_topic=cfg.base_topic)
        self.metrics.outbox_depth.set(depth)
        if cfg.metrics_listen:
            host, port = config_mod.metrics_address(cfg)
            self._metrics_server = self.metrics.serve(host, port)
        self.publisher.start()  # drains what a previous run left in the outbox first
        for s in self.sources:
            s.start()
        self.notifier.notify("READY=1")
        last_stats = last_prune = time.monotonic()
        while not self.stop_event.is_set():
            if self._reload:
                self._reload_registry(pipeline)
            self._process(pipeline, timeout=0.5)
            now = time.monotonic()
            self.notifier.notify("WATCHDOG=1")
            if now - last_stats >= cfg.status_interval_s:
                last_stats = now
                self.publisher.publish_stats(self.metrics.snapshot())
            if now - last_prune >= 3600:
                last_prune = now
                box.prune()
        self.notifier.notify("STOPPING=1")
        logs.event(log, logging.INFO, "stopping: draining queue and outbox")
        for s in self.sources:
            s.join(2)
        while not self.queue.empty():
            self._process(pipeline, timeout=0)
        self.publisher.stop()
        remaining = box.depth()
        box.close()
        if self._metrics_server is not None:
            self._metrics_server[0].shutdown()
        logs.event(log, logging.INFO, "gateway stopped", outbox_depth=remaining)
        return 0

    def _process(self, pipeline, timeout):
        """One group commit of what the sources queued: (source, [receptions]) per read."""
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
        pipeline.process([(source, rec) for source, recs in chunks for rec in recs])
        self.publisher.notify()


def run(config_path):
    cfg = config_mod.load(config_path)
    logs.setup(cfg.log_level)
    gw = Gateway(cfg)
    signal.signal(signal.SIGTERM, gw.request_stop)
    signal.signal(signal.SIGINT, gw.request_stop)
    signal.signal(signal.SIGHUP, gw.request_reload)
    return gw.run()
