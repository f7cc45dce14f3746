"""How one configuration value is checked: Rule (type, bounds, choices) and the checks for values
with a format of their own (HOST:PORT, a list of them, a Redis url). Every problem text names the
key path. The schema built from these rules is config.py's. filesystem_of: which filesystem a path
is on (a state directory in RAM is refused)."""
import ipaddress
import os
import re
import urllib.parse


class Rule:
    """One key of a table: its type, whether it must be given, and the values it may take. The
    schema made of them (config.SCHEMA) is the documentation of the file: every bounded value carries
    its bounds there, checked in one place (Rule.problems), each problem naming the key path and what
    is allowed.

    lo..hi: inclusive bounds; above: an exclusive lower bound (value > above). Every number has an
    upper bound, so inf and nan (TOML allows both) are refused with the rest. choices: the allowed
    values. nonempty: a string that may not be empty or blank. check: a function of the value
    returning a list of problem texts (for values with a format, such as HOST:PORT; a text starting
    with "[i]" names an item of a list)."""

    def __init__(self, typ, required=False, lo=None, hi=None, above=None, choices=None, nonempty=False, check=None):
        self.typ, self.required, self.lo, self.hi, self.above = typ, required, lo, hi, above
        self.choices, self.nonempty, self.check = choices, nonempty, check

    def allowed(self):
        """The allowed range as the problem text gives it: "0..65535", "0 < value <= 100"."""
        if self.above is not None:
            return "%s < value <= %s" % (_num(self.above), _num(self.hi))
        return "%s..%s" % (_num(self.lo), _num(self.hi))

    def within(self, v):
        return (v > self.above if self.above is not None else v >= self.lo) and v <= self.hi  # nan: False

    def problems(self, path, v):
        """[] when v is a valid value for the key at path, else one problem naming path."""
        if isinstance(v, bool) and self.typ is not bool:
            return ["%s: expected %s, got a boolean" % (path, _tname(self.typ))]
        if not isinstance(v, self.typ):
            return ["%s: expected %s, got %r" % (path, _tname(self.typ), v)]
        if self.hi is not None and not self.within(v):
            return ["%s: %s is out of range (%s)" % (path, _num(v), self.allowed())]
        if self.choices is not None and v not in self.choices:
            return ["%s: %r is not one of %s" % (path, v, ", ".join(str(c) for c in sorted(self.choices)))]
        if self.nonempty and not v.strip():
            return ["%s: must not be empty" % path]
        return [path + (p if p.startswith("[") else ": " + p) for p in self.check(v)] if self.check else []


def _num(v):
    return repr(v) if isinstance(v, float) else str(v)  # -1.0, nan, inf as TOML has them; bounds are ints


def _tname(typ):
    if isinstance(typ, tuple):
        return "a number"
    return {str: "a string", int: "an integer", bool: "true or false", list: "a list"}[typ]


NUMBER = (int, float)
PORT = Rule(int, lo=1, hi=65535)


def listen_problems(text):
    """[metrics] listen: "" (off) or HOST:PORT."""
    if not text:
        return []
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return ["expected HOST:PORT, got %r" % text]
    return [] if PORT.lo <= int(port) <= PORT.hi else ["port %s is out of range (%s)" % (port, PORT.allowed())]


def topic_problems(topic):
    """A topic the gateway publishes or subscribes to as is: no wildcards (the Wi-Fi topics)."""
    if "+" in topic or "#" in topic:
        return ["a topic name, without the wildcards + and #, not %r" % topic]
    return []


def sentinel_problems(hosts):
    """[redis] sentinels: ["HOST:PORT", ...]."""
    out = []
    for i, h in enumerate(hosts):
        found = listen_problems(h) if isinstance(h, str) and h else ["expected HOST:PORT, got %r" % (h,)]
        out += ["[%d]: %s" % (i, p) for p in found]
    return out


def redis_url_problems(url):
    """[redis] url: redis://, rediss:// or unix://, a port in range, no password in it."""
    if not url:
        return []
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return ["expected redis://, rediss:// or unix://, got a %r scheme" % url.split(":")[0]]
    if "@" in url:
        return ["no credentials in the url; use redis.username and redis.password_file"]
    if url.startswith("unix://"):
        return []
    netloc = urllib.parse.urlsplit(url).netloc
    port = netloc.rpartition(":")[2] if ":" in netloc.rpartition("]")[2] else ""
    if port and not port.isdigit():
        return ["port %r is not a number" % port]
    if port and not PORT.within(int(port)):
        return ["port %s is out of range (%s)" % (port, PORT.allowed())]
    return []


def _loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def shared_state_problems(rd):
    """[redis], once its values are valid: a shared state is trusted with every bin's counters and
    claims, so it needs authentication (an ACL user and a password file, a registry secret to seal
    the registry), and TLS to any Redis that is not on this machine."""
    if not (rd.get("url") or rd.get("sentinels")):
        return []
    out = ["redis.%s: missing: a shared state needs %s" % (key, why) for key, why in (
        ("username", "authentication (an ACL user, docs/gateway.md §5)"),
        ("password_file", "authentication (the ACL user's password, in a file of mode 0600)"),
        ("registry_secret_file", "the site's registry secret (the same file, mode 0600, on every gateway)"))
        if not rd.get(key)]
    url = rd.get("url", "")
    if url.startswith("redis://") and not _loopback(urllib.parse.urlsplit(url).hostname or ""):
        out.append("redis.url: %s is not on this machine: use rediss:// (TLS) with redis.ca_file" % url)
    remote = [h for h in rd.get("sentinels", []) if not _loopback(h.rpartition(":")[0].strip("[]"))]
    if remote and not rd.get("ca_file"):
        out.append("redis.sentinels: %s not on this machine: TLS needs redis.ca_file" % ", ".join(remote))
    return out


MOUNTINFO = "/proc/self/mountinfo"  # a module-level path: tests point it at a fake table
VOLATILE = {"tmpfs", "ramfs"}  # kept in RAM: a power cut empties them


def _unescape(field):
    """A mountinfo path: space, tab, newline and backslash are written \\040, \\011, \\012, \\134."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def filesystem_of(path, mountinfo=None):
    """(mount point, fstype) of the filesystem path is on (or, while it does not exist, its nearest
    existing parent is), from mountinfo (default MOUNTINFO); None when it cannot be read (not Linux)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        with open(mountinfo or MOUNTINFO, encoding="utf-8", errors="replace") as f:
            table = f.read()
    except OSError:
        return None
    return mount_of(os.path.realpath(path), table)  # a symlink to /run/... is on /run


def mount_of(path, table):
    """(mount point, fstype) for an absolute path from a mountinfo table: the mount point that is
    the longest prefix of the path by whole components; of mounts stacked on one point, the last."""
    best = None
    for line in table.splitlines():
        fields = line.split(" ")  # id parent dev root POINT options [optional...] - FSTYPE source options
        if "-" not in fields[6:-1]:
            continue
        point, fstype = _unescape(fields[4]), fields[fields.index("-", 6) + 1]
        inside = point == "/" or path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype)
    return best
