"""MQTT brokers for tests and the demo: a real Mosquitto on a free loopback port, or amqtt
(pure Python, from PyPI) where Mosquitto is not installed."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("%s exited with code %s" % (proc.args[0], proc.returncode))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("nothing listening on 127.0.0.1:%d after %.0f s" % (port, timeout))


def mosquitto_path():
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


class BrokerProcess:
    """A broker in a child process on 127.0.0.1:port, its files in its own temporary folder."""

    name = "broker"

    def __init__(self, port=None):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="binlink-%s-" % self.name)
        self.proc = None

    def _spawn(self, cmd, timeout=10.0):
        self.log = open(os.path.join(self.dir, "%s.log" % self.name), "ab")
        # its own session: a Ctrl-C in the terminal reaches the demo, which stops the broker last
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port, timeout=timeout, proc=self.proc)
        return self

    def kill(self):
        """SIGKILL, for fault tests; start() brings it back on the same port."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def terminate(self):
        """SIGTERM (a service restart): the broker saves its sessions and closes every connection;
        start() brings it back on the same port."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class Mosquitto(BrokerProcess):
    name = "mosquitto"

    def __init__(self, port=None, extra_conf="", persistent=False):
        self.exe = mosquitto_path()
        if self.exe is None:
            raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
        super().__init__(port)
        os.chmod(self.dir, 0o777)  # started as root, Mosquitto drops to its own user, which must write here
        self.conf = os.path.join(self.dir, "mosquitto.conf")
        with open(self.conf, "w") as f:
            f.write("listener %d 127.0.0.1\nallow_anonymous true\n" % self.port)
            if persistent:  # sessions survive even a SIGKILL: saved after every change
                f.write("persistence true\npersistence_location %s/\nautosave_on_changes true\nautosave_interval 1\n" % self.dir)
            else:
                f.write("persistence false\n")
            # a subscriber in a test must not lose messages to Mosquitto's default queue cap of 1000
            f.write("max_queued_messages 0\nmax_inflight_messages 0\n" + extra_conf)

    def start(self):
        return self._spawn([self.exe, "-c", self.conf])


class Amqtt(BrokerProcess):
    """amqtt (pure Python, from PyPI): the demo's broker where Mosquitto is not installed."""

    name = "amqtt"

    def start(self):
        conf = os.path.join(self.dir, "amqtt.yaml")
        with open(conf, "w") as f:
            f.write("listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:%d\n" % self.port)
            f.write("plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n")
        return self._spawn([os.path.join(os.path.dirname(sys.executable), "amqtt"), "-c", conf], timeout=20)


def embedded(kind="auto"):
    """The demo's broker: Mosquitto where installed (fast), amqtt otherwise."""
    if kind == "mosquitto" or (kind == "auto" and mosquitto_path()):
        return Mosquitto()
    return Amqtt()
