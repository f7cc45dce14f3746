# `umqtt.simple` on the simulated board: micropython-lib's MQTTClient calls binlink uses, with its
# blocking behaviour: connect(timeout=None) sets the socket timeout (sock.settimeout), which then
# bounds the waits for SUBACK and PUBACK; without one a silent broker blocks forever. wait_msg()
# (and so check_msg()) leaves the socket blocking with no timeout (`self.sock.setblocking(True)`
# after its read), as upstream does.
from _host import call


class MQTTException(Exception):
    pass


class _Socket:
    def __init__(self, client):
        self.client = client

    def settimeout(self, timeout):
        self.client.timeout = timeout

    def setblocking(self, flag):
        self.client.timeout = None if flag else 0


class MQTTClient:
    def __init__(self, client_id, server, port=0, user=None, password=None, keepalive=0, ssl=None):
        self.client_id = client_id
        self.server = server
        self.port = port or 1883
        self.timeout = None
        self.cb = None
        self.sock = _Socket(self)

    def set_callback(self, f):
        self.cb = f

    def connect(self, clean_session=True, timeout=None):
        self.timeout = timeout
        err = call("mqtt_connect", self.server, self.port, timeout)
        if err == "refused":
            raise MQTTException(5)  # CONNACK return code 5, not authorised (upstream: MQTTException(resp[3]))
        if err:
            raise OSError(err)
        return False

    def publish(self, topic, msg, retain=False, qos=0):
        err = call("mqtt_publish", topic, bytes(msg).hex(), qos, self.timeout)
        if err:
            raise OSError(err)

    def subscribe(self, topic, qos=0):
        assert self.cb is not None, "Subscribe callback is not set"
        err = call("mqtt_subscribe", topic, qos, self.timeout)
        if err == "refused":
            raise MQTTException(0x80)  # SUBACK 0x80, as upstream raises it
        if err:
            raise OSError(err)

    def check_msg(self):
        got = call("mqtt_check_msg")  # None, or [topic, payload hex]
        self.timeout = None
        if got is None:
            return None
        if got == -1:
            raise OSError(-1)  # the broker closed the connection
        self.cb(got[0].encode(), bytes.fromhex(got[1]))
        return 0x30

    def disconnect(self):
        call("mqtt_disconnect")
