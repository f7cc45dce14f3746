"""Wi-Fi input: frames that bins within Wi-Fi reach publish with umqtt.simple to mqtt.uplink_topic.

An input beside the serial sources, not part of publishing: its own MQTT connection (paho: a few
messages a minute), its frames queued for the pipeline as source "mqtt" like a radio's receptions."""
import logging

import paho.mqtt.client as mqtt

from binlink.gateway import config as config_mod, logs
from binlink.gateway.module_formats import Reception

log = logs.get("wifi")
SOURCE = "mqtt"


class WifiInput:
    def __init__(self, cfg, out_queue):
        m = cfg.mqtt
        self.cfg = cfg
        self.queue = out_queue
        self.topic = m.uplink_topic
        c = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cfg.client_id + "-uplink",
                                      clean_session=False)  # the broker keeps QoS 1 uplinks while we restart
        c.reconnect_delay_set(1, 30)
        config_mod.apply_mqtt_settings(c, m)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            logs.event(log, logging.ERROR, "broker refused the uplink connection", reason=str(reason_code))
            return
        client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        if any(rc.is_failure for rc in reason_codes):
            logs.event(log, logging.ERROR, "broker refused the Wi-Fi uplink subscription", topic=self.topic)
        else:
            logs.event(log, logging.INFO, "taking Wi-Fi uplinks", topic=self.topic)

    def _on_message(self, client, userdata, msg):
        self.queue.put((SOURCE, [Reception(bytes(msg.payload))]))

    def start(self):
        m = self.cfg.mqtt
        self.client.connect_async(m.host, m.port, keepalive=m.keepalive)
        self.client.loop_start()

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()
