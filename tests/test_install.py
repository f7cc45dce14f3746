"""`make install-gateway` into a temporary root, the systemd unit, and sd_notify."""
import os
import shutil
import socket
import subprocess

import pytest

from tests.conftest import ROOT
from tests.harness import GatewayProcess

pytestmark = pytest.mark.xdist_group("build")  # these share build/ (firmware, wheels): one worker runs them all


def install(dest):
    return subprocess.run(["make", "-s", "install-gateway", "DESTDIR=%s" % dest, "INSTALL_VENV=0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_install_is_idempotent_and_keeps_config(tmp_path):
    r = install(tmp_path)
    assert r.returncode == 0, r.stderr
    unit = (tmp_path / "etc/systemd/system/binlink-gateway.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=always", "User=binlink", "ProtectSystem=strict",
                 "StateDirectory=binlink", "DeviceAllow=char-ttyUSB rw", "SupplementaryGroups=dialout"):
        assert line in unit
    planner = (tmp_path / "etc/systemd/system/binlink-planner.service").read_text()
    assert "binlink planner --config /etc/binlink/gateway.toml" in planner and "User=binlink" in planner
    cfg = tmp_path / "etc/binlink/gateway.toml"
    assert oct(cfg.stat().st_mode & 0o777) == "0o640"
    assert oct((tmp_path / "etc/binlink/devices.toml").stat().st_mode & 0o777) == "0o640"
    assert oct((tmp_path / "var/lib/binlink").stat().st_mode & 0o777) == "0o750"
    cfg.write_text(cfg.read_text() + "\n# edited by the installer\n")
    r = install(tmp_path)
    assert r.returncode == 0 and "keeping existing" in r.stdout
    assert cfg.read_text().endswith("# edited by the installer\n")


def test_installed_config_passes_check_config(tmp_path):
    assert install(tmp_path).returncode == 0
    cfg = tmp_path / "etc/binlink/gateway.toml"
    text = cfg.read_text().replace("/etc/binlink/devices.toml", str(tmp_path / "etc/binlink/devices.toml"))
    cfg.write_text(text)
    r = subprocess.run([os.path.join(os.path.dirname(os.sys.executable), "binlink"), "gateway", "check-config", str(cfg)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_unit_sandbox_exposure_is_low():
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                        str(ROOT / "gateway/systemd/binlink-gateway.service")], capture_output=True, text=True)
    line = [l for l in (r.stdout + r.stderr).splitlines() if "Overall exposure level" in l][0]
    level = float(line.split(":")[1].split()[0])
    assert level <= 2.0, line


def test_sd_notify_ready_and_watchdog(tmp_path, broker, pty, monkeypatch):
    sock_path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(sock_path)
    s.settimeout(20)
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)
    g = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=[(1, "b1", bytes(16), 1000, 100)]).start()
    try:
        got = set()
        while not {"READY=1", "WATCHDOG=1"} <= got:
            got.add(s.recv(256).decode())
        g.terminate()
        while "STOPPING=1" not in got:
            got.add(s.recv(256).decode())
    finally:
        if g.alive():
            g.kill()
        s.close()


def test_local_unit_changes_survive_a_reinstall(tmp_path):
    """Drop-ins are never touched; a unit edited in place is kept (the new one written beside it);
    a unit nobody edited is upgraded."""
    assert install(tmp_path).returncode == 0
    units = tmp_path / "etc/systemd/system"
    dropin = units / "binlink-gateway.service.d" / "override.conf"
    dropin.parent.mkdir()
    dropin.write_text("[Service]\nEnvironment=BINLINK_LOCAL=1\n")
    planner = units / "binlink-planner.service"
    planner.write_text(planner.read_text().replace("RestartSec=5", "RestartSec=60"))  # edited in place
    shipped = (ROOT / "gateway/systemd/binlink-gateway.service").read_text()
    # the gateway unit as an older release installed it (unedited): it is upgraded
    older = shipped.replace("RestartSec=2", "RestartSec=3")
    (units / "binlink-gateway.service").write_text(older)
    (tmp_path / "opt/binlink/share/systemd/binlink-gateway.service").write_text(older)
    r = install(tmp_path)
    assert r.returncode == 0, r.stderr
    assert dropin.read_text() == "[Service]\nEnvironment=BINLINK_LOCAL=1\n" and "drop-ins kept: override.conf" in r.stdout
    assert "RestartSec=60" in planner.read_text() and "KEEPING" in r.stdout
    assert (units / "binlink-planner.service.binlink-new").read_text() == (ROOT / "gateway/systemd/binlink-planner.service").read_text()
    assert (units / "binlink-gateway.service").read_text() == shipped


def test_binlink_is_on_the_administrators_path(tmp_path):
    assert install(tmp_path).returncode == 0
    assert os.readlink(tmp_path / "usr/local/bin/binlink") == "/opt/binlink/venv/bin/binlink"
    unit = (tmp_path / "etc/systemd/system/binlink-gateway.service").read_text()
    assert "ExecStartPre=-/opt/binlink/venv/bin/binlink gateway check-config --offline" in unit
