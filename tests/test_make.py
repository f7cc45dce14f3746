"""`make test` on a machine without the system packages: one line naming the command, before any test runs."""
import os
import subprocess

from tests.conftest import ROOT

# What tools/system-deps.sh must find, written out here on its own: command -> Debian package.
NEEDED = [("mosquitto", "mosquitto"), ("mosquitto_passwd", "mosquitto"), ("redis-server", "redis-server"),
          ("openssl", "openssl")]


def test_missing_system_packages_are_named_in_one_line(tmp_path):
    # no PATH: the tools look missing and `id` cannot say we are root, as for a user without sudo rights;
    # no virtual environment and no python3 to run ensurepip: python3-venv is missing too
    env = {"PATH": "/nonexistent", "VENV": str(tmp_path / "no-venv"), "PYTHON": "/nonexistent/python3"}
    r = subprocess.run(["/bin/sh", str(ROOT / "tools" / "system-deps.sh")], env=env, cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=30)
    # the script also looks in /usr/sbin (Debian puts mosquitto there, outside a user's PATH)
    missing = []
    for cmd, pkg in NEEDED:
        if not os.access("/usr/sbin/" + cmd, os.X_OK) and pkg not in missing:
            missing.append(pkg)
    missing.append("python3-venv")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "error: the tests need %s; run: sudo apt-get install -y %s\n" % (" ".join(missing), " ".join(missing))
