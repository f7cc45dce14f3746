"""Publish stage: drains the durable outbox to the broker with paho-mqtt, QoS 1.

A message leaves the outbox only when the broker's PUBACK arrives (on_publish). Messages handed
to paho while the link is down stay in paho's session and are resent on reconnect; after a
restart everything not acknowledged is sent again from the outbox, in order."""
import json
import logging
import os
import queue
import ssl
import threading
import time

import paho.mqtt.client as mqtt

from binlink.gateway import homeassistant, integrate, logs
from binlink.gateway.outbox import Outbox

log = logs.get("mqtt")
ACK_GROUP = 500  # acks written to the outbox in groups: one transaction each
ACK_FLUSH_S = 0.05
ACK_POLL_S = 0.005


class Publisher:
    def __init__(self, cfg, outbox_path, devices, metrics, on_uplink=None):
        """on_uplink(frame bytes): a frame a Wi-Fi bin published on the uplink topic."""
        self.cfg = cfg
        self.outbox_path = outbox_path
        self.devices = devices
        self.metrics = metrics
        self.on_uplink = on_uplink
        self.base = cfg.base_topic
        self.status_topic = integrate.status_topic(self.base, cfg.gateway_id)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.idle = threading.Event()  # outbox empty and nothing in flight
        self._acks = queue.SimpleQueue()
        self._inflight = {}  # mid -> (outbox id, received_at)
        self._acked = []  # outbox ids acknowledged by the broker, not yet marked in the outbox
        self._lock = threading.Lock()  # publish() and recording its mid happen together
        self._thread = threading.Thread(target=self._run, name="mqtt-publisher", daemon=True)
        self.firmware = {}  # device hex -> firmware version from its hello (the pipeline fills it)
        self.discovery = homeassistant.Discovery(os.path.join(cfg.state_dir, "discovery.json"), cfg.mqtt.discovery_prefix,
                                                 self.base, cfg.site)
        self._discovery_due = None  # None, "changes" or "all": sent by the feeder thread, not in a paho callback
        self._discovery_lock = threading.Lock()  # requests come from paho's thread and the pipeline's
        self.client = self._make_client()

    def _make_client(self):
        m = self.cfg.mqtt
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.cfg.client_id, clean_session=True)
        c.max_inflight_messages_set(m.max_inflight)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(1, 30)
        c.will_set(self.status_topic, "offline", qos=1, retain=True)
        if m.username:
            password = m.password
            if m.password_file:
                with open(m.password_file) as f:
                    password = f.read().strip()
            c.username_pw_set(m.username, password or None)
        if m.tls:
            c.tls_set(ca_certs=m.ca_file or None, certfile=m.cert_file or None, keyfile=m.key_file or None,
                      cert_reqs=ssl.CERT_REQUIRED)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        return c

    # paho callbacks (network thread) --------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            logs.event(log, logging.ERROR, "broker refused connection", reason=str(reason_code))
            return
        logs.event(log, logging.INFO, "connected to broker", host=self.cfg.mqtt.host, port=self.cfg.mqtt.port)
        client.publish(self.status_topic, "online", qos=1, retain=True)
        if self.cfg.mqtt.discovery:
            client.subscribe("%s/status" % self.cfg.mqtt.discovery_prefix, qos=1)
            self.request_discovery()
        if self.cfg.mqtt.uplink_topic and self.on_uplink:
            client.subscribe(self.cfg.mqtt.uplink_topic, qos=1)
        self.metrics.mqtt_connected.set(1)
        self.connected.set()
        self.wake.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        self.metrics.mqtt_connected.set(0)
        if not self.stopping.is_set():
            logs.event(log, logging.WARNING, "broker connection lost, reconnecting", reason=str(reason_code))

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self._acks.put(mid)
        # wake the feeder once a quarter of the window is free, not per PUBACK: fewer, larger
        # rounds (the feeder also looks every ACK_POLL_S)
        if self._acks.qsize() >= self.cfg.mqtt.max_inflight // 4:
            self.wake.set()

    def _on_message(self, client, userdata, msg):
        if msg.topic == self.cfg.mqtt.uplink_topic and self.on_uplink:
            self.on_uplink(bytes(msg.payload))
            return
        if msg.topic == "%s/status" % self.cfg.mqtt.discovery_prefix and msg.payload == b"online":
            logs.event(log, logging.INFO, "Home Assistant restarted, republishing discovery")
            self.request_discovery(force=True)

    def request_discovery(self, force=False):
        """Discovery is due: what changed (registry, firmware), or everything (force)."""
        if self.cfg.mqtt.discovery:
            with self._discovery_lock:
                self._discovery_due = "all" if force or self._discovery_due == "all" else "changes"
            self.wake.set()

    def _publish_discovery(self):
        with self._discovery_lock:
            due, self._discovery_due = self._discovery_due, None
        sent = self.discovery.changes(self.devices, self.firmware, force=due == "all")
        for topic, payload in sent:
            self.client.publish(topic, payload, qos=1, retain=True)
        if sent:
            self.discovery.mark(sent)
        logs.event(log, logging.INFO, "discovery published" if sent else "discovery unchanged",
                   configs=sum(1 for _, p in sent if p), cleared=sum(1 for _, p in sent if not p))

    # feeder thread ---------------------------------------------------------------------------
    def start(self):
        m = self.cfg.mqtt
        self.client.connect_async(m.host, m.port, keepalive=m.keepalive)
        self.client.loop_start()
        self._thread.start()

    def _run(self):
        box = Outbox(self.outbox_path, durable=False)
        last_fed = 0
        last_ack_flush = time.monotonic()
        window = self.cfg.mqtt.max_inflight
        try:
            while True:
                # poll fast only while acknowledgements can arrive; a broker outage costs no CPU
                self.wake.wait(ACK_POLL_S if self._inflight and self.connected.is_set() else 0.5)
                self.wake.clear()
                self._take_acks()
                if self._acked and (len(self._acked) >= ACK_GROUP or time.monotonic() - last_ack_flush >= ACK_FLUSH_S
                                    or self.stopping.is_set()):
                    self._write_acks(box)
                    last_ack_flush = time.monotonic()
                if self.connected.is_set() and self._discovery_due:
                    self._publish_discovery()
                if self.connected.is_set():
                    room = window - len(self._inflight)
                    if room > 0:
                        rows = box.pending(last_fed, room)
                        with self._lock:
                            for row_id, topic, payload, retain, received_at in rows:
                                info = self.client.publish(topic, payload, qos=1, retain=bool(retain))
                                self._inflight[info.mid] = (row_id, received_at)
                                last_fed = row_id
                if not self._inflight and not self._acked and not box.pending(last_fed, 1):
                    self.idle.set()
                    if self.stopping.is_set():
                        return
                else:
                    self.idle.clear()
        finally:
            box.close()

    def _take_acks(self):
        """PUBACKs received: free their window slots now; the outbox learns of them in groups."""
        now = time.time()
        with self._lock:
            while True:
                try:
                    mid = self._acks.get_nowait()
                except queue.Empty:
                    break
                hit = self._inflight.pop(mid, None)
                if hit is not None:
                    self._acked.append(hit[0])
                    self.metrics.publish_latency.observe(max(0.0, now - hit[1]))

    def _write_acks(self, box):
        done, self._acked = self._acked, []
        self.metrics.outbox_depth.dec(box.ack(done))
        self.metrics.published.inc(len(done))

    def notify(self):
        self.wake.set()

    def publish_stats(self, stats):
        if self.connected.is_set():
            self.client.publish(integrate.stats_topic(self.base, self.cfg.gateway_id), json.dumps(stats, sort_keys=True), qos=0)

    def stop(self, drain_timeout_s=10.0):
        """Waits (bounded) for the outbox to drain, says offline, disconnects."""
        self.wake.set()
        if self.connected.is_set():
            self.idle.wait(drain_timeout_s)
        self.stopping.set()
        self.wake.set()
        self._thread.join(drain_timeout_s)
        if self.connected.is_set():
            self.client.publish(self.status_topic, "offline", qos=1, retain=True).wait_for_publish(2)
        self.client.disconnect()
        self.client.loop_stop()
