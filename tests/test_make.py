"""`make test` on a machine without the system packages: one line naming the command, before any test runs."""
import subprocess

from tests.conftest import ROOT


def test_missing_system_packages_are_named_in_one_line():
    # no PATH: the tools look missing and `id` cannot say we are root, as for a user without sudo rights
    r = subprocess.run(["/bin/sh", str(ROOT / "tools" / "system-deps.sh")], env={"PATH": "/nonexistent"},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: the tests need ") and "redis-server" in line
    assert line.endswith("run: sudo apt-get install -y" + line[len("error: the tests need"):line.index(";")])
