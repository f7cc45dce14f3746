"""Wi-Fi input: frames that bins within Wi-Fi reach publish with umqtt.simple to mqtt.uplink_topic.

An input beside the serial sources, not part of publishing: its own MQTT connection (paho: a few
messages a minute), its frames queued for the pipeline as source "mqtt" like a radio's receptions.
Anyone allowed to publish there can send anything, as often as they like: copies of a frame are
deduplicated by the pipeline like a radio's; a payload longer than any frame is refused here.

MQTT 5, for three things 3.1.1 cannot say: the broker sends nothing longer than MAX_PACKET (what a
client publishes beyond it is dropped there, never buffered here), a session lasts SESSION_EXPIRY_S
and no longer, and the broker names a takeover ("session taken over") when another client connects
with this client id."""
import logging
import os
import secrets
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from binlink.gateway import config as config_mod, logs
from binlink.gateway.module_formats import Reception
from binlink.gateway.uplink import Reason

log = logs.get("wifi")
SOURCE = "mqtt"
MAX_PAYLOAD = 512  # the longest frame is a backlog batch of 11 + 9·n bytes: payloads beyond are refused (oversize)
MAX_PACKET = 4096  # told the broker: longer messages are dropped there (memory here stays bounded)
# The session, and the QoS 1 uplinks the broker queues in it, outlive a restart of the gateway by
# this long. Its client id is kept in the state directory for that: a new id would start an empty
# session, and the old one would hold queued uplinks nobody reads until it expired.
SESSION_EXPIRY_S = 86400
SUFFIX_FILE = "wifi-uplink-client-id"
SESSION_TAKEN_OVER = 0x8E  # a DISCONNECT reason code
SHORT_SESSION_S = 10.0  # brokers that just close the connection: this short, SHORT_SESSIONS times in a row
SHORT_SESSIONS = 3


class WifiInput:
    def __init__(self, cfg, out_queue, metrics):
        self.cfg = cfg
        self.queue = out_queue
        self.metrics = metrics
        self.topic = cfg.mqtt.uplink_topic
        self.client = None  # made at start: its client id lives in the state directory
        self._client_id = None
        self._connected_at = None
        self._short_sessions = 0

    def client_id(self):
        """<client_id>-uplink-<a suffix this gateway drew once>: unique to this gateway's state,
        the same across its restarts (so the broker keeps its session and the uplinks queued in it)."""
        path = os.path.join(self.cfg.state_dir, SUFFIX_FILE)
        try:
            with open(path) as f:
                suffix = f.read().strip()
        except FileNotFoundError:
            suffix = ""
        if len(suffix) != 8 or not all(c in "0123456789abcdef" for c in suffix):
            suffix = secrets.token_hex(4)
            try:
                with open(path, "w") as f:
                    f.write(suffix + "\n")
            except OSError as e:
                logs.event(log, logging.WARNING, "Wi-Fi uplink client id not saved: after a restart the broker starts a "
                           "new session, uplinks queued in the old one are not read", path=path, error=e.strerror or str(e))
        return "%s-uplink-%s" % (self.cfg.client_id, suffix)

    def start(self):
        m = self.cfg.mqtt
        self._client_id = self.client_id()
        c = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self._client_id, protocol=mqtt.MQTTv5)
        c.reconnect_delay_set(1, 30)
        config_mod.apply_mqtt_settings(c, m)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        connect = Properties(PacketTypes.CONNECT)
        connect.SessionExpiryInterval = SESSION_EXPIRY_S
        connect.MaximumPacketSize = MAX_PACKET
        c.connect_async(m.host, m.port, keepalive=m.keepalive, clean_start=False, properties=connect)
        c.loop_start()

    def stop(self):
        if self.client is not None:
            self._connected_at = None  # our own disconnect: no loss to tell
            self.client.disconnect()
            self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            logs.event(log, logging.ERROR, "broker refused the uplink connection", reason=str(reason_code))
            return
        self._connected_at = time.monotonic()
        client.subscribe(self.topic, qos=1)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        """A takeover said (ERROR, binlink_wifi_uplink_takeovers_total): another client with this
        client id gets the uplinks while it holds the session, and the two throw each other out."""
        if self._connected_at is None:  # a connect that failed, or our own disconnect
            return
        lasted, self._connected_at = time.monotonic() - self._connected_at, None
        self._short_sessions = self._short_sessions + 1 if lasted < SHORT_SESSION_S else 0
        if reason_code == SESSION_TAKEN_OVER or self._short_sessions >= SHORT_SESSIONS:
            self._short_sessions = 0
            self.metrics.wifi_takeovers.inc()
            logs.event(log, logging.ERROR, "Wi-Fi uplink connection taken over (or closed again and again right after "
                       "connecting): another client with this gateway's uplink client id takes uplinks meant for it",
                       client_id=self._client_id, reason=str(reason_code), connected_s=round(lasted, 1))
        elif reason_code.is_failure:
            logs.event(log, logging.WARNING, "Wi-Fi uplink connection lost", reason=str(reason_code))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        if any(rc.is_failure for rc in reason_codes):
            logs.event(log, logging.ERROR, "broker refused the Wi-Fi uplink subscription", topic=self.topic)
        else:
            logs.event(log, logging.INFO, "taking Wi-Fi uplinks", topic=self.topic)

    def send_downlink(self, device_id, frame):
        """An answer to a Wi-Fi bin on <downlink_topic>/<device hex>, QoS 0 and not retained: the
        bin listens for about a second after its uplink, and a late or kept copy is worth nothing to
        it. False when the connection is down (the answer is skipped, the bin resends)."""
        topic = "%s/%06x" % (self.cfg.mqtt.downlink_topic, device_id)
        return self.client is not None and self.client.publish(topic, frame, qos=0).rc == mqtt.MQTT_ERR_SUCCESS

    def _on_message(self, client, userdata, msg):
        payload = msg.payload
        if len(payload) > MAX_PAYLOAD:  # counted as a rejection; the bytes are not kept
            rec = Reception(None, Reason.OVERSIZE.value, detail="Wi-Fi payload of %d bytes, at most %d" % (len(payload), MAX_PAYLOAD))
        else:
            rec = Reception(bytes(payload))
        self.queue.put((SOURCE, [rec]))
