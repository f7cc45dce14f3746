"""TLS and username/password against a real Mosquitto: the gateway publishes; wrong creds do not."""
import os
import shutil
import subprocess

import pytest

from binlink.wire import codec, framing
from binlink.sim.broker import Mosquitto
from tests.harness import KEY, GatewayProcess, Subscriber, wait_for


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=binlink test CA",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-extfile", "ext.cnf", "-out", "server.crt", cwd=d)
    for f in d.iterdir():
        f.chmod(0o644)
    return d


@pytest.fixture
def tls_broker(pki):
    b = Mosquitto()  # its own folder is readable by the mosquitto user; pytest's tmp folders are not
    for name in ("ca.crt", "server.crt", "server.key"):
        shutil.copy(pki / name, os.path.join(b.dir, name))
        os.chmod(os.path.join(b.dir, name), 0o644)
    pw = os.path.join(b.dir, "passwd")
    subprocess.run(["mosquitto_passwd", "-b", "-c", pw, "gateway", "s3cret-test"], check=True, capture_output=True)
    subprocess.run(["mosquitto_passwd", "-b", pw, "reader", "reader-test"], check=True, capture_output=True)
    os.chmod(pw, 0o644)
    with open(b.conf, "a") as f:  # the later allow_anonymous line wins
        f.write("cafile {0}/ca.crt\ncertfile {0}/server.crt\nkeyfile {0}/server.key\npassword_file {1}\n"
                "allow_anonymous false\n".format(b.dir, pw))
    b.start()
    yield b
    b.stop()


def test_tls_with_username_and_password(tls_broker, pki, tmp_path, pty):
    (tmp_path / "mqtt-password").write_text("s3cret-test\n")
    (tmp_path / "mqtt-password").chmod(0o600)  # a world-readable password file is refused (test below)
    extra = 'tls = true\nca_file = "%s"\nusername = "gateway"\npassword_file = "%s"\n' % (pki / "ca.crt", tmp_path / "mqtt-password")
    g = GatewayProcess(tmp_path, tls_broker.port, [("radio0", pty.link, "raw")], devices=[(0xA1, "bin-a", KEY, 1200, 200)],
                       mqtt_extra=extra, mqtt_host="localhost").start()
    sub = Subscriber(tls_broker.port, ca_file=str(pki / "ca.crt"), auth=("reader", "reader-test"))
    try:
        pty.write(framing.frame(codec.encode_reading(KEY, 0xA1, 1, 700, 20, 3700)))
        wait_for(lambda: sub.events(), what="event over TLS")
        assert g.metric("binlink_mqtt_connected") == 1
        assert "s3cret-test" not in g.output()
    finally:
        sub.close()
        g.kill()


def test_wrong_password_is_reported_and_nothing_is_lost(tls_broker, pki, tmp_path, pty):
    extra = 'tls = true\nca_file = "%s"\nusername = "gateway"\npassword = "wrong"\n' % (pki / "ca.crt")
    g = GatewayProcess(tmp_path, tls_broker.port, [("radio0", pty.link, "raw")], devices=[(0xA1, "bin-a", KEY, 1200, 200)],
                       mqtt_extra=extra, mqtt_host="localhost").start()
    try:
        pty.write(framing.frame(codec.encode_reading(KEY, 0xA1, 1, 700, 20, 3700)))
        wait_for(lambda: g.metric("binlink_frames_accepted_total") == 1, what="accepted")
        wait_for(lambda: "broker refused connection" in g.output(), what="refusal logged")
        assert g.metric("binlink_mqtt_connected") == 0 and g.metric("binlink_outbox_depth") >= 1
        assert g.alive()
    finally:
        g.kill()
