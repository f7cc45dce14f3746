"""Device registry: one TOML file listing every bin, its 128-bit key and its calibration.

The file is secret (keys): the gateway refuses one readable by other users, and never logs or
publishes a key. `add()` is what provisioning (`make flash`) uses to register a new bin."""
import hashlib
import os
import re
import stat
import tomllib
from dataclasses import dataclass

import tomli_w

from binlink.gateway.config import ConfigError

_BIN_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Device:
    device_id: int
    bin_id: str
    key: bytes
    depth_mm: int  # sensor to bin floor: an empty bin
    full_mm: int  # sensor to surface at which the bin counts as full
    name: str = ""
    lat: float | None = None
    lon: float | None = None
    report_s: int = 3600  # the bin's longest time between reports (Home Assistant's expire_after follows it)

    @property
    def key_id(self):
        """A fingerprint of the key (not the key): counters belong to a key, not only a device id."""
        return hashlib.sha256(b"binlink key id\x00" + self.key).hexdigest()[:16]

    @property
    def dev(self):
        """Device id as it appears in topics and message ids: 6 hex digits."""
        return "%06x" % self.device_id

    def __repr__(self):  # never show the key
        return "Device(%s, bin=%s)" % (self.dev, self.bin_id)


def parse_device_id(v):
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, str) and re.fullmatch(r"[0-9a-fA-F]{1,6}", v):
        n = int(v, 16)
    else:
        raise ValueError("device_id must be up to 6 hex digits or an integer, got %r" % (v,))
    if not 0 <= n <= 0xFFFFFF:
        raise ValueError("device_id out of range: %r" % (v,))
    return n


def parse(data, path="registry"):
    problems = []
    devices = {}
    bins = set()
    entries = data.get("device", []) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(["%s: [[device]] must be an array of tables" % path])
    for i, d in enumerate(entries):
        p = "%s: device[%d]" % (path, i)
        if not isinstance(d, dict):
            problems.append("%s: must be a table ([[device]])" % p)
            continue
        found = []
        dev_id = None
        try:
            dev_id = parse_device_id(d.get("device_id"))
        except ValueError as e:
            found.append("%s.device_id: %s" % (p, e))
        key_hex = d.get("key", "")
        if not (isinstance(key_hex, str) and re.fullmatch(r"[0-9a-fA-F]{32}", key_hex)):
            found.append("%s.key: must be 32 hex digits (128 bits)" % p)  # never echo the value
        bin_id = d.get("bin_id", "")
        if not (isinstance(bin_id, str) and _BIN_ID.match(bin_id)):
            found.append("%s.bin_id: %r must be lowercase letters, digits, - or _" % (p, bin_id))
        depth, full = d.get("depth_mm"), d.get("full_mm")
        if not (type(depth) is int and type(full) is int and 0 <= full < depth):
            found.append("%s: need integers 0 <= full_mm < depth_mm, got full_mm=%r depth_mm=%r" % (p, full, depth))
        for opt, typ in (("name", str), ("lat", (int, float)), ("lon", (int, float)), ("report_s", int)):
            if opt in d and (not isinstance(d[opt], typ) or isinstance(d[opt], bool)):
                found.append("%s.%s: wrong type" % (p, opt))
        if isinstance(d.get("report_s"), int) and not 60 <= d["report_s"] <= 7 * 86400:
            found.append("%s.report_s: must be 60 s to a week, got %r" % (p, d["report_s"]))
        unknown = set(d) - {"device_id", "key", "bin_id", "depth_mm", "full_mm", "name", "lat", "lon", "report_s"}
        if unknown:
            found.append("%s: unknown keys %s" % (p, ", ".join(sorted(unknown))))
        if dev_id is not None and dev_id in devices:
            found.append("%s.device_id: %06x listed twice" % (p, dev_id))
        if isinstance(bin_id, str) and bin_id in bins:
            found.append("%s.bin_id: %r listed twice" % (p, bin_id))
        problems += found
        if not found:
            bins.add(bin_id)
            devices[dev_id] = Device(dev_id, bin_id, bytes.fromhex(key_hex), depth, full, d.get("name", ""), d.get("lat"), d.get("lon"),
                                     d.get("report_s", 3600))
    if problems:
        raise ConfigError(problems)
    return devices


def load(path, check_permissions=True):
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(["registry %s: no such file" % path]) from None
    except PermissionError:
        raise ConfigError(["registry %s: permission denied (the service user must be able to read it)" % path]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(["registry %s: not valid TOML: %s" % (path, e)]) from None
    if check_permissions and st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(["registry %s: readable by other users; it holds device keys (chmod 640)" % path])
    return parse(data, "registry %s" % path)


def add(path, device_id, bin_id, key, depth_mm, full_mm, name="", lat=None, lon=None):
    """Adds or replaces one device in the registry file, atomically, mode 0600."""
    data = {"device": []}
    if os.path.exists(path):
        with open(path, "rb") as f:
            data = tomllib.load(f)
    entry = {"device_id": "%06x" % device_id, "bin_id": bin_id, "key": key.hex(), "depth_mm": depth_mm, "full_mm": full_mm}
    if name:
        entry["name"] = name
    if lat is not None:
        entry["lat"], entry["lon"] = lat, lon
    kept = [d for d in data.get("device", []) if parse_device_id(d["device_id"]) != device_id and d.get("bin_id") != bin_id]
    data["device"] = kept + [entry]
    parse(data, "registry %s" % path)
    write(path, data)


def write(path, data):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(b"# binlink device registry: holds device keys, keep it mode 0600/0640\n")
        tomli_w.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
