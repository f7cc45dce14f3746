"""The ESP32's Wi-Fi and a broker as umqtt.simple meets them: the board's stand-in ops for
network.WLAN and umqtt.simple (upy/network.py, upy/umqtt/simple.py), a mixin of Board.

Association takes `connect_ms` after WLAN.connect and lasts while the radio is on; the broker is
"ok", "down" (connections refused), "refuses" (CONNACK code 5: not authorised) or "silent"
(connects, never answers: only the socket timeout ends a wait); wifi["denied"]: topics its ACL
refuses to subscribe to (SUBACK 0x80). The session is clean: a message reaches it only on a topic it subscribed
to in this session (Board.mqtt_deliver puts the simulation's messages on its way)."""


class WifiOps:
    """Needs the board's wifi dict, esp, now, advance(), _recount(), transmit and mqtt_sent."""

    def op_wlan_active(self, on):
        if on is not None:
            self.esp.wifi_on = bool(on)
            if not on:  # the association is gone with the radio: the next one takes connect_ms again
                self.wifi["associated"] = False
                self.wifi.pop("connect_at", None)
            self._recount()
        return self.esp.wifi_on

    def op_wlan_connect(self, ssid, key):
        self.wifi["connect_at"] = self.now + self.wifi["connect_ms"]

    def op_wlan_isconnected(self):
        w = self.wifi
        w["associated"] = w["ap"] and self.esp.wifi_on and self.now >= w.get("connect_at", 1e18)
        return w["associated"]

    def _socket_wait(self, timeout_s, answer_ms):
        """Blocks like a socket read: the answer after answer_ms, or ETIMEDOUT (116) after the
        socket timeout; with no timeout a silent peer blocks until the watchdog bites."""
        if answer_ms is not None and (timeout_s is None or answer_ms <= timeout_s * 1000):
            self.advance(answer_ms)
            return 0
        if timeout_s is None:
            while True:
                self.advance(60_000.0)
        self.advance(timeout_s * 1000.0)
        return 116

    def op_mqtt_connect(self, server, port, timeout):
        b = self.wifi["broker"]
        self.wifi["subscribed"] = None  # a clean session: no subscription, nothing kept for it
        if not self.wifi["associated"] or b == "down":
            self.advance(50.0)
            return 113  # ECONNABORTED / host unreachable
        if b == "refuses":  # CONNACK with a refusal (wrong credentials), then the broker closes
            self.advance(80.0)
            return "refused"
        return self._socket_wait(timeout, 80.0 if b == "ok" else None)

    def op_mqtt_publish(self, topic, hexmsg, qos, timeout):
        b = self.wifi["broker"]
        if b == "ok":
            self.mqtt_sent.append(bytes.fromhex(hexmsg))
            self.transmit(bytes.fromhex(hexmsg), 0, 0, 0, 0)
            return self._socket_wait(timeout, 40.0 if qos else 1.0)
        return self._socket_wait(timeout, None if qos or b == "silent" else 1.0)

    def op_mqtt_subscribe(self, topic, qos, timeout):
        """SUBSCRIBE, then its SUBACK: from then on the session gets what is published on topic."""
        b = self.wifi["broker"]
        if b == "ok" and topic in self.wifi.get("denied", ()):  # the broker's ACL: SUBACK 0x80
            self.advance(40.0)
            return "refused"
        if b == "ok":
            self.wifi["subscribed"] = topic
        return self._socket_wait(timeout, 40.0 if b == "ok" else None)

    def mqtt_deliver(self, topic, payload, at_ms):
        """The broker sends the board's session a message at board time at_ms (a simulated gateway's
        answer): umqtt reads it at the next check_msg from then on, if the session subscribed to
        its topic by then (a broker sends nothing else). topic None: the broker closes the
        connection at at_ms."""
        self.wifi["inbox"].append((at_ms, topic, bytes(payload)))

    def op_mqtt_check_msg(self):
        """umqtt's check_msg(): reads what has arrived without waiting: [topic, payload hex], None
        when nothing has, -1 when the broker closed the connection."""
        w = self.wifi
        while w["inbox"] and min(w["inbox"], key=_arrival)[0] <= self.now:
            m = min(w["inbox"], key=_arrival)
            w["inbox"].remove(m)
            if m[1] is None:
                w["subscribed"] = None
                return -1
            if m[1] == w["subscribed"]:
                return [m[1], m[2].hex()]
        return None

    def op_mqtt_disconnect(self):
        self.wifi["subscribed"] = None


def _arrival(message):
    return message[0]
