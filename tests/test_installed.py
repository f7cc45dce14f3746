"""An installed gateway as an installer meets it (issue 22).

`make install-gateway DESTDIR=stage` with the real venv, relocated to /opt/binlink/venv; the stage
run at its final path (a private mount namespace binds the stage's /opt over /opt) through the
command administrators have on PATH ($BINDIR/binlink), as root and as the service user (setpriv).
The service user is `binlink-test`, created here: creating `binlink` itself would change what
every other test's check-config checks as. Needs root (users, ownership, mount namespaces); not
root, the module is skipped."""
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from binlink.gateway import registry
from tests.conftest import ROOT

pytestmark = [pytest.mark.xdist_group("build"),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates the service user, gives files its "
                                 "ownership and binds the stage at /opt in a mount namespace"),
              pytest.mark.skipif(not (shutil.which("unshare") and shutil.which("setpriv")),
                                 reason="needs unshare and setpriv (util-linux)")]
SERVICE_USER = "binlink-test"
# a gateway's Python is the system's (/usr/bin/python3 on Raspberry Pi OS); this machine's default may
# live where the service user cannot read it
SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") and subprocess.run(
    ["/usr/bin/python3", "-c", "import ensurepip, venv"], capture_output=True).returncode == 0 else "python3"


@pytest.fixture(scope="module")
def service_user():
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--groups", "dialout",
                        SERVICE_USER], capture_output=True)  # another worker may have made it meanwhile: looked up below
        return pwd.getpwnam(SERVICE_USER)


@pytest.fixture(scope="module")
def stage(service_user):
    d = Path(tempfile.mkdtemp(prefix="binlink-stage-"))
    d.chmod(0o755)  # the service user walks into it, as into /
    r = subprocess.run(["make", "-s", "install-gateway", "DESTDIR=%s" % d], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, SERVICE_USER=SERVICE_USER, PYTHON=SYSTEM_PYTHON))
    if r.returncode != 0 and ("No matching distribution" in r.stderr or "Could not find a version" in r.stderr):
        shutil.rmtree(d, ignore_errors=True)
        pytest.skip("no package index reachable: the stage's venv cannot be built here")
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = d / "etc/binlink/gateway.toml"  # the stage's own files, not this machine's /etc and /var
    cfg.write_text(cfg.read_text().replace('"/etc/binlink/', '"%s/etc/binlink/' % d)
                   .replace('"/var/lib/binlink"', '"%s/var/lib/binlink"' % d))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def installed(stage, *args, user=None, env=None):
    """`binlink ARGS` as an administrator types it, the stage at /opt, as root or as `user`."""
    as_user = [] if user is None else ["setpriv", "--reuid=%s" % user, "--regid=%s" % user, "--init-groups"]
    cmd = ["unshare", "-m", "sh", "-c", 'mount --bind "$0/opt" /opt && exec "$@"', str(stage), *as_user,
           str(stage / "usr/local/bin/binlink"), *map(str, args)]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SUDO_", "BINLINK_", "PYTHON"))}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(base, **(env or {})), cwd="/")


def one_line_error(r):
    lines = r.stderr.strip().splitlines()
    return len(lines) == 1 and "Traceback" not in r.stderr and lines[0].startswith(("error", "config error"))


def test_the_stage_is_relocated_to_its_final_path(stage, service_user):
    again = subprocess.run(["make", "-s", "install-gateway", "DESTDIR=%s" % stage], cwd=ROOT, capture_output=True, text=True,
                           timeout=600, env=dict(os.environ, SERVICE_USER=SERVICE_USER, PYTHON=SYSTEM_PYTHON))
    assert again.returncode == 0, again.stderr  # an upgrade of a relocated stage (its scripts name /opt, not the stage)
    assert os.readlink(stage / "usr/local/bin/binlink") == "/opt/binlink/venv/bin/binlink"
    assert (stage / "opt/binlink/venv/bin/binlink").read_text().splitlines()[0].startswith("#!/opt/binlink/venv/bin/python")
    marker = str(stage).encode()
    for folder, _, files in os.walk(stage / "opt"):
        for f in files:
            p = os.path.join(folder, f)
            if not os.path.islink(p):
                with open(p, "rb") as fh:
                    assert marker not in fh.read(), p  # no stage path in scripts, pyvenv.cfg or compiled files
    r = installed(stage, "--version", user=SERVICE_USER)
    assert r.returncode == 0 and r.stdout.startswith("binlink "), r.stderr


def test_registry_commands_on_the_installed_gateway(stage, service_user, tmp_path):
    cfg = stage / "etc/binlink/gateway.toml"
    reg = stage / "etc/binlink/devices.toml"
    st = reg.stat()
    assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o777)) == (0, service_user.pw_gid, "0o640")
    before = reg.read_bytes()
    # as the service user: the registry is root's to change; one line saying so, nothing changed
    r = installed(stage, "registry", "--config", cfg, "add", "ms-1", "--depth-mm", 1200, "--full-mm", 250, user=SERVICE_USER)
    assert r.returncode == 1 and one_line_error(r) and "permission denied" in r.stderr, r.stderr
    assert "sudo binlink registry" in r.stderr and "as user %s" % SERVICE_USER in r.stderr and reg.read_bytes() == before
    # as root, through sudo: owner, group and mode kept; the key file handed to the administrator
    admin = Path(tempfile.mkdtemp(prefix="binlink-admin-"))
    try:
        os.chown(admin, service_user.pw_uid, service_user.pw_gid)  # the administrator's home
        sudo = {"SUDO_UID": str(service_user.pw_uid), "SUDO_GID": str(service_user.pw_gid)}
        r = installed(stage, "registry", "--config", cfg, "add", "ms-1", "--depth-mm", 1200, "--full-mm", 250,
                      "--key-out", admin / "ms1.key", env=sudo)
        assert r.returncode == 0 and "added: bin ms-1" in r.stdout, r.stderr
        st = reg.stat()
        assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o777)) == (0, service_user.pw_gid, "0o640")
        assert sorted(os.listdir(stage / "etc/binlink")) == ["devices.toml", "gateway.toml"]  # no temporary file left
        key = admin / "ms1.key"
        assert (key.stat().st_uid, oct(key.stat().st_mode & 0o777)) == (service_user.pw_uid, "0o600")
        dev = registry.load(str(reg)).by_bin("ms-1")
        assert dev.key.hex() not in r.stdout + r.stderr
        assert registry.load(str(key)).by_bin("ms-1").key == dev.key  # what make flash KEY_FILE= takes
    finally:
        shutil.rmtree(admin)
    # the service user reads what root wrote
    r = installed(stage, "registry", "--config", cfg, "list", user=SERVICE_USER)
    assert r.returncode == 0 and "ms-1" in r.stdout and dev.dev in r.stdout, r.stderr
    r = installed(stage, "registry", "--config", cfg, "add", "ms-1", "--depth-mm", 1200, "--full-mm", 250)
    assert r.returncode == 2 and "already registered" in r.stderr and one_line_error(r)
    # retire queues the clears for the service (a spool file it takes in): as root, what it
    # leaves in the state directory is the service's, which deletes it once taken in
    r = installed(stage, "registry", "--config", cfg, "retire", "ms-1")
    assert r.returncode == 0, r.stderr
    state = stage / "var/lib/binlink"
    assert {(p.name, p.stat().st_uid) for p in state.iterdir()} == {(p.name, service_user.pw_uid) for p in state.iterdir()}
    queued = list((state / "spool").iterdir())
    assert [p.suffix for p in queued] == [".json"] and queued[0].stat().st_uid == service_user.pw_uid


def test_check_config_runs_as_the_service_user(stage, service_user):
    cfg = stage / "etc/binlink/gateway.toml"
    r = installed(stage, "gateway", "check-config", "--offline", "--user", SERVICE_USER, cfg)
    assert r.returncode == 0 and "checked as user %s" % SERVICE_USER in r.stdout, r.stdout + r.stderr
    assert "warning: source[0].port" in r.stderr  # the sample's radio is not plugged in here: said, not fatal
    cfg.chmod(0o600)  # root's alone: the service could not read its config
    try:
        r = installed(stage, "gateway", "check-config", "--offline", "--user", SERVICE_USER, cfg)
        assert r.returncode == 2 and "%s: cannot be read by user %s" % (cfg, SERVICE_USER) in r.stderr, r.stderr
    finally:
        cfg.chmod(0o640)
    state = stage / "var/lib/binlink"
    os.chown(state, 0, 0)  # a state dir the service user cannot write: root could, check-config says so
    try:
        r = installed(stage, "gateway", "check-config", "--offline", "--user", SERVICE_USER, cfg)
        assert r.returncode == 2 and "gateway.state_dir: cannot write in %s as user %s" % (state, SERVICE_USER) in r.stderr
    finally:
        os.chown(state, service_user.pw_uid, service_user.pw_gid)


def test_a_serial_port_the_service_user_cannot_open_is_an_error(stage, service_user, pty):
    cfg = stage / "etc/binlink/gateway-pty.toml"
    cfg.write_text((stage / "etc/binlink/gateway.toml").read_text()
                   .replace("/dev/serial/by-id/usb-1a86_USB_Serial-if00-port0", os.path.realpath(pty.link)))
    os.chown(cfg, 0, service_user.pw_gid)
    cfg.chmod(0o640)
    os.chmod(os.path.realpath(pty.link), 0o600)  # root's alone, as a port outside dialout
    try:
        r = installed(stage, "gateway", "check-config", "--offline", "--user", SERVICE_USER, cfg)
    finally:
        cfg.unlink()
    assert r.returncode == 2 and "source[0].port" in r.stderr and "permission denied" in r.stderr, r.stderr
    assert "as user %s" % SERVICE_USER in r.stderr
