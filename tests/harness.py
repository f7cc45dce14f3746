"""Real parts for integration tests: the gateway as a subprocess, a paho subscriber, config files."""
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import paho.mqtt.client as mqtt
from prometheus_client.parser import text_string_to_metric_families

from binlink.gateway import registry
from binlink.sim.broker import free_port, wait_port

BINLINK = os.path.join(os.path.dirname(sys.executable), "binlink")
KEY = bytes(range(16))  # TEST KEY
KEY2 = bytes.fromhex("5445535420b1e57e57206b65792d3221")  # TEST KEY


def wait_for(pred, timeout=20.0, interval=0.05, what="condition"):
    """pred() until it is true. A predicate that looks up what has not arrived yet (the last
    message of a topic with none so far: IndexError, KeyError) is asked again, not failed at once."""
    deadline = time.monotonic() + timeout
    missing = None
    while time.monotonic() < deadline:
        try:
            v = pred()
        except LookupError as e:
            v, missing = None, e
        if v:
            return v
        time.sleep(interval)
    raise AssertionError("timed out after %.0f s waiting for %s%s" % (timeout, what, "" if missing is None else " (last: %r)" % missing))


def fill_volume(folder):
    """Writes a filler file until the volume holding folder is full; returns its path."""
    path = os.path.join(str(folder), "filler")
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return path


def decoded(dev):
    """Every frame a SimDevice put on air, verified with its key counter by counter and decoded."""
    from binlink.wire import codec

    out, last = [], None
    for f in dev.frames():
        d = codec.decode(f, dev.key, last)
        last = d["fcnt"]
        out.append(d)
    return out


class Subscriber:
    """Collects every message under the given topics; reconnects quickly after a broker restart."""

    def __init__(self, port, topics=("binlink/#", "homeassistant/#"), persistent=False, ca_file=None, auth=None):
        self.messages = []
        self.arrivals = {}  # message_id -> time.perf_counter() of its first arrival (benchmarks)
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.topics = topics
        # persistent: a session the broker keeps (and queues for) while this subscriber is away
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-sub-%d-%d" % (os.getpid(), id(self)),
                             clean_session=not persistent)
        self.c.reconnect_delay_set(1, 1)
        if ca_file:
            self.c.tls_set(ca_certs=ca_file)
        if auth:
            self.c.username_pw_set(*auth)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.connect("localhost" if ca_file else "127.0.0.1", port)
        self.c.loop_start()
        assert self.subscribed.wait(10), "subscriber did not subscribe"

    def _on_connect(self, client, userdata, flags, rc, props):
        client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client, userdata, msg):
        with self.lock:
            if msg.dup and (msg.topic, msg.payload, msg.retain) in self.messages:
                return  # the broker redelivering to us after its restart, not a second publish
            self.messages.append((msg.topic, msg.payload, msg.retain))
            if msg.topic.endswith("/event"):
                mid = json.loads(msg.payload).get("message_id")
                self.arrivals.setdefault(mid, time.perf_counter())

    def on(self, suffix):
        with self.lock:
            return [(t, p) for t, p, _ in self.messages if t.endswith(suffix)]

    def json(self, suffix):
        return [json.loads(p) for _, p in self.on(suffix)]

    def events(self, kind="uplink"):
        return [m for m in self.json("/event") if m["event"] == kind]

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def ctrl_c_default():
    """preexec_fn for a program a test stops with Ctrl-C: SIGINT at its default, as a shell starts a
    foreground program. A suite started in the background (`make test &`) has SIGINT ignored, and
    an ignored signal stays ignored across exec: the program would never see the Ctrl-C."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_registry(path, devices):
    """devices: list of (device_id, bin_id, key, depth_mm, full_mm)."""
    if os.path.exists(path):
        os.unlink(path)
    for dev, bin_id, key, depth, full in devices:
        registry.add(path, dev, bin_id, key, depth, full)


def write_config(path, *, registry_path, state_dir, broker_port, sources, metrics_port, mqtt_extra="", mqtt_host="127.0.0.1",
                 gateway_id="gw-test", extra=""):
    lines = [
        "[gateway]", 'id = "%s"' % gateway_id, 'site = "testcity"', 'registry = "%s"' % registry_path,
        'state_dir = "%s"' % state_dir, "status_interval_s = 1", 'log_level = "info"',
        # the state dir is under pytest's tmp_path, a tmpfs on some CI runners, and the full-disk tests
        # mount a small tmpfs on purpose: a real gateway refuses a state dir in RAM without this
        "allow_volatile_state = true", "",
    ]
    for name, link, fmt in sources:
        lines += ["[[source]]", 'name = "%s"' % name, 'port = "%s"' % link, 'format = "%s"' % fmt, ""]
    lines += ["[mqtt]", 'host = "%s"' % mqtt_host, "port = %d" % broker_port, mqtt_extra, "", "[metrics]",
              'listen = "127.0.0.1:%d"' % metrics_port, "", extra]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


class GatewayProcess:
    """`binlink gateway --config ...` as a real process, its metrics read over HTTP."""

    def __init__(self, tmp, broker_port, sources, devices=None, mqtt_extra="", mqtt_host="127.0.0.1", gateway_id="gw-test",
                 extra=""):
        self.tmp = str(tmp)
        self.gateway_id = gateway_id
        os.makedirs(self.tmp, exist_ok=True)
        self.registry = os.path.join(self.tmp, "devices.toml")
        if devices is not None:
            write_registry(self.registry, devices)
        self.metrics_port = free_port()
        self.config = os.path.join(self.tmp, "gateway.toml")
        write_config(self.config, registry_path=self.registry, state_dir=os.path.join(self.tmp, "state"),
                     broker_port=broker_port, sources=sources, metrics_port=self.metrics_port, mqtt_extra=mqtt_extra,
                     mqtt_host=mqtt_host, gateway_id=gateway_id, extra=extra)
        self.log_path = os.path.join(self.tmp, "gateway.log")
        self.proc = None

    def start(self, wait_sources=True):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([BINLINK, "gateway", "--config", self.config], stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.metrics_port, timeout=20, proc=self.proc)
            if wait_sources:
                wait_for(lambda: self.metric("binlink_serial_connected") >= 1, what="serial port open")
        except BaseException:  # one that did not come up is not left running: it would hold its pty's lock,
            self.proc.terminate()  # and a later test's pty of the same number could not be opened
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            raise
        return self

    def metrics(self):
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.metrics_port, timeout=5) as r:
            text = r.read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name, **labels):
        """Sum of the samples of name whose labels include the given ones."""
        total = 0.0
        for (n, lbls), v in self.metrics().items():
            if n == name and all(dict(lbls).get(k) == v2 for k, v2 in labels.items()):
                total += v
        return total

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def terminate(self, timeout=20):
        self.proc.terminate()
        return self.proc.wait(timeout)

    def output(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()


REDIS_PASSWORD = "test-password-5f1e"  # TEST PASSWORD
REDIS_ACL = ["user default off",  # the ACL user docs/gateway.md sets up, limited to binlink's keys and commands
             "user binlink on >%s ~binlink:* resetchannels -@all +@read +@write +@scripting +ping +info" % REDIS_PASSWORD]


class RedisServer:
    """A real redis-server on a free loopback port, no persistence; killable and restartable on
    the same port (gateways reconnect to it)."""

    def __init__(self, tmp, conf_lines=None, tls_dir=None):
        """tls_dir: a folder with ca.crt, server.crt, server.key: TLS only (rediss://), no plain port."""
        self.port = free_port()
        self.tmp = str(tmp)
        self.tls_dir = tls_dir
        conf_lines = REDIS_ACL if conf_lines is None else conf_lines
        if tls_dir:
            conf_lines = list(conf_lines) + ["tls-cert-file %s/server.crt" % tls_dir, "tls-key-file %s/server.key" % tls_dir,
                                             "tls-ca-cert-file %s/ca.crt" % tls_dir, "tls-auth-clients no"]
        self.conf = os.path.join(self.tmp, "redis-%d.conf" % self.port)
        with open(self.conf, "w") as f:  # e.g. ACL `user ...` lines, as docs/gateway.md sets them up
            f.write("".join(line + "\n" for line in conf_lines))
        self.proc = None

    def start(self):
        ports = ["--port", "0", "--tls-port", str(self.port)] if self.tls_dir else ["--port", str(self.port)]
        self.proc = subprocess.Popen(["redis-server", self.conf, *ports, "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.tmp], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port, timeout=10, proc=self.proc)
        return self

    @property
    def url(self):
        return ("rediss://localhost:%d/0" if self.tls_dir else "redis://127.0.0.1:%d/0") % self.port

    def config(self, ttl_s=3600, ca_file=None):
        """The [redis] table of every gateway of the test site: the ACL user, its password and the
        site's registry secret in files of mode 0600 (check-config refuses anything looser)."""
        pw_file, secret_file = os.path.join(self.tmp, "redis.password"), os.path.join(self.tmp, "registry.secret")
        for path, text in ((pw_file, REDIS_PASSWORD), (secret_file, "5445535420" * 8)):  # TEST SECRET
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(text + "\n")
        return ('[redis]\nurl = "%s"\nusername = "binlink"\npassword_file = "%s"\nregistry_secret_file = "%s"\n'
                'dedup_ttl_s = %s\nregistry_poll_s = 0.5\n%s' % (self.url, pw_file, secret_file, ttl_s,
                                                                 'ca_file = "%s"\n' % ca_file if ca_file else ""))

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


def key_from_key_file(path):
    """The key in a `registry add/rekey --key-out` file (one [[device]] entry, TOML)."""
    import tomllib
    with open(path, "rb") as f:
        return bytes.fromhex(tomllib.load(f)["device"][0]["key"])
