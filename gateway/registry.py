"""Device registry: one TOML file listing every bin, its 128-bit key and its calibration.

The file is secret (keys): the gateway refuses one readable by other users, and never logs or
publishes a key. Its home is /etc/binlink/devices.toml on a gateway (BINLINK_REGISTRY overrides), never build/.

Identity (docs/gateway.md, Bin identity): a bin's device id is drawn at random from the 24-bit space, skipping every
id the registry lists, active or retired, and is never reused; the bin keeps it when it is re-flashed or re-keyed.
Each new key raises the bin's `key_epoch`, so message ids `<device>:<epoch>:<fcnt>` stay unique when the counter
starts again under a new key. `provision()` serves `make flash` and `registry add`; `registry set`: registry_settings."""
import collections
import hashlib
import os
import re
import secrets
import stat
import time
import tomllib
from dataclasses import dataclass
from functools import cached_property

from binlink.gateway import registry_settings
from binlink.gateway.config import ConfigError
from binlink.gateway.registry_file import exclusive, write  # noqa: F401 (registry.write: the one writer)

_BIN_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # fullmatch: "$" would let a trailing newline through


def valid_bin_id(bin_id):
    """Bin ids go into MQTT topics and Home Assistant ids: lowercase letters, digits, - and _ (never
    `/`, `+`, `#` or NUL, which would change or break the topic), 64 characters at most."""
    return isinstance(bin_id, str) and _BIN_ID.fullmatch(bin_id) is not None


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
    key_epoch: int = 0  # raised by one at every new key: message ids stay unique across keys
    report_s: int = 3600  # the bin's longest time between reports (Home Assistant's expire_after follows it)
    settings: tuple = ()  # desired settings the registry sets, (name, value) sorted (registry_settings.py)

    @cached_property  # asked for every frame
    def key_id(self):
        """A fingerprint of the key (not the key): counters belong to a key, not only a device id."""
        return hashlib.sha256(b"binlink key id\x00" + self.key).hexdigest()[:16]

    @property
    def dev(self):
        """Device id as it appears in topics and message ids: 6 hex digits."""
        return "%06x" % self.device_id

    @property
    def message_prefix(self):
        """`<device>:<epoch>`: what every message id of this bin under this key starts with."""
        return "%06x:%d" % (self.device_id, self.key_epoch)

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


DEFAULT_PATH = "/etc/binlink/devices.toml"  # a gateway's registry
GATEWAY_CONFIG = "/etc/binlink/gateway.toml"  # present on a gateway (make install-gateway)
NAME_MAX = 200  # a bin's display name (Home Assistant, the outbox's records)
DEPTH_MAX = 10000  # mm: sensor to bin floor; the sensors themselves measure 300-5000 (make flash checks that)
_DEVICE_KEYS = {"device_id", "key", "key_epoch", "bin_id", "depth_mm", "full_mm", "name", "lat", "lon", "report_s", "settings"}


def workstation_path():
    """A technician's registry, outside build/ (which `make clean` deletes)."""
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "binlink", "devices.toml")


def default_path():
    """The one rule every tool follows (`make flash`, `binlink registry`, `binlink watch`):
    $BINLINK_REGISTRY when set; else on a gateway (/etc/binlink/gateway.toml exists) its config's
    registry (/etc/binlink/devices.toml); else the workstation's ~/.local/share/binlink/devices.toml.
    A bin flashed on a workstation reaches a gateway by `binlink registry import` (docs/gateway.md)."""
    if os.environ.get("BINLINK_REGISTRY") or not os.path.exists(GATEWAY_CONFIG):
        return os.environ.get("BINLINK_REGISTRY") or workstation_path()
    from binlink.gateway import config

    try:
        return config.load(GATEWAY_CONFIG).registry
    except ConfigError:  # check-config names what is wrong with it
        return DEFAULT_PATH


class Registry(dict):
    """device_id -> Device, plus `retired`: device_id -> (bin_id, retired_at), never to be reused."""

    def __init__(self, devices=(), retired=None):
        super().__init__(devices)
        self.retired = dict(retired or {})
        self.rejected = []  # problems of the entries skipped by a lenient load (parse(strict=False))

    def by_bin(self, bin_id):
        for d in self.values():
            if d.bin_id == bin_id:
                return d
        return None

    def taken(self):
        return set(self) | set(self.retired)


def parse_device(d, p):
    """(Device, []) for one [[device]] table, or (None, problems naming p): the one set of rules for
    an entry, whether it comes from the registry file, the shared state (Redis), `make flash`'s
    arguments or `binlink registry add|import` (entry_problems)."""
    if not isinstance(d, dict):
        return None, ["%s: must be a table ([[device]])" % p]
    found = entry_problems(d, p)
    if found:
        return None, found
    return Device(parse_device_id(d["device_id"]), d["bin_id"], bytes.fromhex(d["key"]), d["depth_mm"], d["full_mm"],
                  d.get("name", ""), d.get("lat"), d.get("lon"), d.get("key_epoch", 0), d.get("report_s", 3600),
                  registry_settings.parse(d.get("settings"))), []


def entry_problems(d, p):
    """Every problem of one registry entry (a dict as in the file), each naming p and the key."""
    found = []
    try:
        parse_device_id(d.get("device_id"))
    except ValueError as e:
        found.append("%s.device_id: %s" % (p, e))
    key_hex = d.get("key", "")
    if not (isinstance(key_hex, str) and re.fullmatch(r"[0-9a-fA-F]{32}", key_hex)):
        found.append("%s.key: must be 32 hex digits (128 bits)" % p)  # never echo the value
    bin_id = d.get("bin_id", "")
    if not valid_bin_id(bin_id):
        found.append("%s.bin_id: %r must be lowercase letters, digits, - or _" % (p, bin_id))
    depth, full = d.get("depth_mm"), d.get("full_mm")
    if not (type(depth) is int and type(full) is int and 0 <= full < depth <= DEPTH_MAX):
        found.append("%s: need integers 0 <= full_mm < depth_mm <= %d, got full_mm=%r depth_mm=%r" % (p, DEPTH_MAX, full, depth))
    epoch = d.get("key_epoch", 0)
    if not (type(epoch) is int and 0 <= epoch < 2**32):  # 32 bits in the outbox's records
        found.append("%s.key_epoch: must be an integer from 0 to 4294967295, got %r" % (p, epoch))
    for opt, typ in (("name", str), ("lat", (int, float)), ("lon", (int, float)), ("report_s", int)):
        if opt in d and (not isinstance(d[opt], typ) or isinstance(d[opt], bool)):
            found.append("%s.%s: wrong type" % (p, opt))
    name = d.get("name")
    if isinstance(name, str) and (len(name) > NAME_MAX or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        found.append("%s.name: at most %d characters, no control characters (got %d characters)" % (p, NAME_MAX, len(name)))
    for opt, bound in (("lat", 90), ("lon", 180)):
        v = d.get(opt)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not -bound <= v <= bound:  # nan fails too
            found.append("%s.%s: %r is out of range (-%d..%d)" % (p, opt, v, bound, bound))
    if ("lat" in d) != ("lon" in d):
        found.append("%s: give both lat and lon, or neither" % p)
    if isinstance(d.get("report_s"), int) and not 60 <= d["report_s"] <= 7 * 86400:
        found.append("%s.report_s: must be 60 s to a week, got %r" % (p, d["report_s"]))
    found += registry_settings.problems(d, p)
    unknown = set(d) - _DEVICE_KEYS
    if unknown:
        found.append("%s: unknown keys %s" % (p, ", ".join(sorted(unknown))))
    return found


_HEADER = re.compile(r"^[ \t]*\[\[[ \t]*(device|retired)[ \t]*\]\]", re.M)


def entry_lines(text):
    """{"device": [line of each [[device]] header], "retired": [...]} in the file's order (1-based):
    problems name the line an installer opens the file at, not an index."""
    lines = {"device": [], "retired": []}
    line, pos = 1, 0
    for m in _HEADER.finditer(text or ""):  # counted on from the last header: 10,000 bins in linear time
        line += text.count("\n", pos, m.start())
        pos = m.start()
        lines[m.group(1)].append(line)
    return lines


def _where(path, kind, i, lines, entry):
    """'registry PATH line 14, bin market-1: device[3]': the line and the bin first, the index kept."""
    at = lines.get(kind, [])
    line = " line %d" % at[i] if i < len(at) else ""
    bin_id = entry.get("bin_id") if isinstance(entry, dict) else None
    named = ", bin %s" % (bin_id if valid_bin_id(bin_id) else repr(bin_id)) if bin_id is not None else ""
    return "%s%s%s: %s[%d]" % (path, line, named, kind, i)


def parse(data, path="registry", text=None, strict=True):
    """The Registry of a parsed file. strict: any problem raises ConfigError listing them all. Not
    strict (the gateway's start and reload): an entry with a problem is skipped and its problems
    are kept in `.rejected` (each naming the file, line and bin); every other bin is loaded. A file
    that is not a registry at all ([[device]] not a list) raises either way."""
    problems = []
    rejected = []
    devices = {}
    lines = entry_lines(text)
    entries = data.get("device", []) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(["%s: [[device]] must be an array of tables" % path])
    parsed = []
    for i, d in enumerate(entries):
        p = _where(path, "device", i, lines, d)
        device, found = parse_device(d, p)
        parsed.append((p, device, found))
    ids = collections.Counter(dev.device_id for _, dev, _ in parsed if dev is not None)
    bins = collections.Counter(dev.bin_id for _, dev, _ in parsed if dev is not None)
    gone = data.get("retired", [])
    if not isinstance(gone, list):
        problems.append("%s: [[retired]] must be an array of tables" % path)
        gone = []
    retired = {}
    for i, r in enumerate(gone):
        p = _where(path, "retired", i, lines, r)
        try:
            dev_id = parse_device_id(r.get("device_id") if isinstance(r, dict) else None)
        except ValueError as e:
            problems.append("%s.device_id: %s" % (p, e))
            continue
        retired[dev_id] = (str(r.get("bin_id", "")), str(r.get("retired_at", "")))
    for p, device, found in parsed:
        if device is not None:  # listed twice: which key is right is not known, so neither is used
            if ids[device.device_id] > 1:
                found.append("%s.device_id: %06x listed twice" % (p, device.device_id))
            if bins[device.bin_id] > 1:
                found.append("%s.bin_id: %r listed twice" % (p, device.bin_id))
            if device.device_id in retired:
                found.append("%s.device_id: %06x is retired (ids are never reused)" % (p, device.device_id))
        if found:
            rejected += found
        else:
            devices[device.device_id] = device
    if strict and (problems or rejected):
        raise ConfigError(rejected + problems)
    if problems:  # [[retired]] damaged: a retired id could be taken again, so no registry at all
        raise ConfigError(problems)
    reg = Registry(devices, retired)
    reg.rejected = rejected
    return reg


def load(path, check_permissions=True, strict=True):
    """The registry file at path (see parse for strict). A file that cannot be read, is not TOML or
    is readable by other users raises ConfigError."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8", "replace")
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(["registry %s: no such file" % path]) from None
    except PermissionError:
        raise ConfigError(["registry %s: permission denied (the service user must be able to read it)" % path]) from None
    except IsADirectoryError:
        raise ConfigError(["registry %s: is a directory" % path]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(["registry %s: not valid TOML: %s" % (path, e)]) from None
    if check_permissions and st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(["registry %s: readable by other users; it holds device keys (chmod 640)" % path])
    return parse(data, "registry %s" % path, text=text, strict=strict)


def load_for_service(path, metrics=None, loaded=None):
    """The gateway's registry at start and on reload: an entry with a problem costs its bin only. Each
    one skipped is logged at ERROR naming the file, line and bin, and counted in the gauge
    binlink_registry_entries_rejected (also in the stats topic); every other bin works. loaded: the
    file as load(path, strict=False) just read it (the start reads 10,000 bins once, not twice)."""
    import logging

    from binlink.gateway import logs

    reg = load(path, strict=False) if loaded is None else loaded
    for problem in reg.rejected:
        logs.event(logs.get("registry"), logging.ERROR, "REGISTRY ENTRY SKIPPED: its bin's frames are refused until "
                   "the entry is fixed (binlink gateway check-config)", problem=problem)
    if metrics is not None:
        gauge = getattr(metrics, "registry_rejected", None)
        if gauge is None:
            from prometheus_client import Gauge

            gauge = metrics.registry_rejected = Gauge(
                "binlink_registry_entries_rejected", "Registry entries skipped at the last load (start or reload) "
                "because of a problem; their bins are unknown", registry=metrics.registry)
        gauge.set(len(reg.rejected))
    return reg


def load_or_empty(path):
    return load(path, check_permissions=False) if os.path.exists(path) else Registry()


def allocate_id(taken, rng=secrets.randbelow):
    """A random device id in 1 … 0xFFFFFE not in `taken` (every id ever used, retired ones too).
    Random rather than sequential: two registries that allocate apart rarely collide, and the
    shared registry (Redis) claims each id atomically across the fleet."""
    if len(taken) >= 0xFFFFFE // 2:
        raise ConfigError(["device id space is half used: allocate from a fresh site registry"])
    while True:
        n = 1 + rng(0xFFFFFE)
        if n not in taken:
            return n


def device_entry(d):
    """A Device as its [[device]] table (the inverse of parse_device)."""
    entry = {"device_id": d.dev, "bin_id": d.bin_id, "key": d.key.hex(), "key_epoch": d.key_epoch,
             "depth_mm": d.depth_mm, "full_mm": d.full_mm}
    if d.name:
        entry["name"] = d.name
    if d.lat is not None:
        entry["lat"], entry["lon"] = d.lat, d.lon
    if d.report_s != Device.report_s:
        entry["report_s"] = d.report_s
    entry.update({"settings": dict(d.settings)} if d.settings else {})
    return entry


def to_data(reg):
    """The TOML document for a Registry (the inverse of parse)."""
    devices = [device_entry(d) for d in sorted(reg.values(), key=lambda d: d.bin_id)]
    retired = [{"device_id": "%06x" % dev, "bin_id": b, "retired_at": at} for dev, (b, at) in sorted(reg.retired.items())]
    return {"device": devices, "retired": retired}


def save(path, reg):
    parse(to_data(reg), "registry %s" % path)
    write(path, to_data(reg))


@exclusive
def add(path, device_id, bin_id, key, depth_mm, full_mm, name="", lat=None, lon=None, report_s=None, key_epoch=None):
    """Registers device_id as bin_id, or gives it a new key and calibration. A new key for a bin
    already registered raises its key_epoch. A retired id, or a bin id held by another device, is
    refused: ids never move between bins. The file is locked meanwhile (registry_file.locked)."""
    reg = load_or_empty(path)
    if device_id in reg.retired:
        raise ConfigError(["device %06x was retired (bin %s): ids are never reused" % (device_id, reg.retired[device_id][0])])
    holder = reg.by_bin(bin_id)
    if holder is not None and holder.device_id != device_id:
        raise ConfigError(["bin %s is device %s: re-key it (binlink registry rekey) instead of a new id" % (bin_id, holder.dev)])
    old = reg.get(device_id)
    if old is not None and old.bin_id != bin_id:
        raise ConfigError(["device %s is bin %s, not %s" % (old.dev, old.bin_id, bin_id)])
    epoch = 0 if old is None else old.key_epoch + (old.key != key)
    if key_epoch is not None:  # a key made elsewhere (binlink registry add --key-out) keeps its epoch
        if old is not None and key_epoch < old.key_epoch:
            raise ConfigError(["bin %s: key epoch %d is older than this registry's %d: not taken"
                               % (bin_id, key_epoch, old.key_epoch)])
        epoch = key_epoch
    reg[device_id] = Device(device_id, bin_id, key, depth_mm, full_mm, name or (old.name if old else ""),
                            lat if lat is not None else (old.lat if old else None),
                            lon if lon is not None else (old.lon if old else None), epoch,
                            report_s or (old.report_s if old else Device.report_s), old.settings if old else ())
    save(path, reg)
    return reg[device_id]


def provision(path, bin_id, depth_mm, full_mm, name="", key=None, taken=(), lat=None, lon=None, report_s=None):
    """The bin's device (new key): a bin already registered keeps its id (re-flash, re-key), a new
    bin gets a fresh random id not in the registry nor in `taken` (ids the fleet claimed)."""
    reg = load_or_empty(path)
    holder = reg.by_bin(bin_id)
    device_id = holder.device_id if holder else allocate_id(reg.taken() | set(taken))
    return add(path, device_id, bin_id, key or secrets.token_bytes(16), depth_mm, full_mm, name, lat, lon, report_s)


def rekey(path, bin_id, key=None):
    reg = load_or_empty(path)
    d = reg.by_bin(bin_id)
    if d is None:
        raise ConfigError(["bin %s is not in registry %s" % (bin_id, path)])
    return add(path, d.device_id, bin_id, key or secrets.token_bytes(16), d.depth_mm, d.full_mm)


@exclusive
def retire(path, bin_id, now=None):
    """Removes the bin, keeping its id on the retired list for good. Returns its last Device."""
    reg = load_or_empty(path)
    d = reg.by_bin(bin_id)
    if d is None:
        raise ConfigError(["bin %s is not in registry %s" % (bin_id, path)])
    del reg[d.device_id]
    reg.retired[d.device_id] = (bin_id, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)))
    save(path, reg)
    return d
