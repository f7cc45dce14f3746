# `umqtt.simple` on the simulated board: micropython-lib's MQTTClient calls binlink uses, with its
# blocking behaviour: connect(timeout=None) sets the socket timeout (sock.settimeout), which then
# also bounds publish()'s wait for the QoS 1 PUBACK; without one a silent broker blocks forever.
from _host import call


class MQTTException(Exception):
    pass


class MQTTClient:
    def __init__(self, client_id, server, port=0, user=None, password=None, keepalive=0, ssl=None):
        self.client_id = client_id
        self.server = server
        self.port = port or 1883
        self.timeout = None

    def connect(self, clean_session=True, timeout=None):
        self.timeout = timeout
        err = call("mqtt_connect", self.server, self.port, timeout)
        if err:
            raise OSError(err)
        return False

    def publish(self, topic, msg, retain=False, qos=0):
        err = call("mqtt_publish", topic, bytes(msg).hex(), qos, self.timeout)
        if err:
            raise OSError(err)

    def disconnect(self):
        call("mqtt_disconnect")
