"""Gateway configuration (TOML): load, apply defaults, and name every problem by its key path.
The schema (SCHEMA) is the documentation of the file; the rules it is made of are in config_rules."""
import os
import stat
import tomllib
from dataclasses import dataclass, field

from binlink.gateway import config_rules
from binlink.gateway.config_rules import (NUMBER, PORT, VOLATILE, Rule, listen_problems, redis_url_problems,
                                          sentinel_problems, shared_state_problems, topic_problems)
from binlink.gateway.module_formats import FORMATS


class ConfigError(Exception):
    """Raised with every problem found, each naming its key path."""

    def __init__(self, problems):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class Source:
    name: str
    port: str
    baud: int = 115200
    format: str = "raw"
    downlink: bool = True  # answer bins that listen (downlink.py); false: this radio never transmits
    sf: int = 9  # the radio's LoRa settings, for the time on air of the gateway's own downlinks ...
    bandwidth_khz: int = 125
    duty_cycle: float = 0.01  # ... kept within the sub-band's duty cycle (EU868 g/g1: 1 %)
    answer_within_ms: int = 150  # later than this after the uplink (group start to write), an answer is skipped


@dataclass
class Mqtt:
    host: str = "localhost"
    port: int = 1883
    client_id: str = ""
    base_topic: str = ""
    username: str = ""
    password: str = ""
    password_file: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    keepalive: int = 30
    discovery: bool = True
    discovery_prefix: str = "homeassistant"
    # "device": one retained config per bin (Home Assistant 2024.12 and later); "entity": one per entity
    discovery_mode: str = "device"
    uplink_topic: str = "binlink/uplink"  # frames from Wi-Fi bins (umqtt.simple); "" turns it off
    downlink_topic: str = "binlink/downlink"  # answers to Wi-Fi bins on <this>/<device hex>; "" = none
    max_inflight: int = 4000  # QoS 1 messages awaiting PUBACK (docs/gateway.md: publisher)


@dataclass
class Redis:
    """[redis]: state shared by several gateways (gateway/shared_state.py); off when url and
    sentinels are empty. TLS: a rediss:// url (with ca_file, and cert_file/key_file for client
    certificates). Auth: an ACL user and a password in a file only the service user can read; the
    registry secret seals the registry entries in Redis (docs/gateway.md §5)."""
    url: str = ""  # redis://host:6379/0 or rediss://host:6380/0; no password in it
    username: str = ""
    password_file: str = ""
    registry_secret_file: str = ""  # the same file on every gateway of the site, mode 0600
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    sentinels: list = field(default_factory=list)  # ["host:26379", ...]: Redis Sentinel instead of url
    sentinel_master: str = "mymaster"
    cluster: bool = False
    prefix: str = "binlink"
    timeout_s: float = 0.5
    dedup_ttl_s: float = 3600.0
    registry_poll_s: float = 5.0

    @property
    def enabled(self):
        return bool(self.url or self.sentinels)


@dataclass
class Events:
    full_pct: float = 90.0
    emptied_drop_pct: float = 15.0
    low_battery_mv: int = 3300


@dataclass
class Config:
    gateway_id: str
    site: str
    registry: str
    state_dir: str
    sources: list = field(default_factory=list)
    mqtt: Mqtt = field(default_factory=Mqtt)
    events: Events = field(default_factory=Events)
    redis: Redis = field(default_factory=Redis)
    dedup_window_s: float = 30.0
    status_interval_s: float = 60.0
    metrics_listen: str = ""
    log_level: str = "info"
    allow_volatile_state: bool = False  # a state_dir on tmpfs/ramfs: refused unless true (check_files)

    @property
    def base_topic(self):
        return self.mqtt.base_topic or "binlink/%s" % self.site

    @property
    def client_id(self):
        return self.mqtt.client_id or "binlink-%s" % self.gateway_id


_BAUDS = {1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600}
_LEVELS = {"debug", "info", "warning", "error"}
DAY_S = 86400

_GATEWAY = {
    "id": Rule(str, required=True, nonempty=True), "site": Rule(str, required=True, nonempty=True),
    "registry": Rule(str, required=True, nonempty=True), "state_dir": Rule(str, required=True, nonempty=True),
    # the dedup table holds every frame of the window in memory: a day at most
    "dedup_window_s": Rule(NUMBER, above=0, hi=DAY_S),
    "status_interval_s": Rule(NUMBER, lo=1, hi=DAY_S),
    "log_level": Rule(str, choices=_LEVELS),
    # a state_dir on tmpfs or ramfs loses the outbox and the counters at a power cut: refused unless true
    "allow_volatile_state": Rule(bool),
}
_SOURCE = {
    "name": Rule(str, nonempty=True), "port": Rule(str, required=True, nonempty=True),
    "baud": Rule(int, choices=_BAUDS),  # the rates every USB-serial bridge and LoRa module offers
    "format": Rule(str, choices=set(FORMATS)),
    "downlink": Rule(bool), "sf": Rule(int, lo=7, hi=12), "bandwidth_khz": Rule(int, choices={125, 250, 500}),
    "answer_within_ms": Rule(int, lo=10, hi=60000),  # the bins' turnaround budget is 200 ms (docs/protocol.md)
    "duty_cycle": Rule(NUMBER, above=0, hi=1),  # a fraction: 0.01 is 1 %, 0.1 the 869.4-869.65 MHz sub-band's 10 %
}
_MQTT = {
    "host": Rule(str, nonempty=True), "port": PORT,
    "client_id": Rule(str), "base_topic": Rule(str),  # "": the defaults binlink-<id>, binlink/<site>
    "username": Rule(str), "password": Rule(str), "password_file": Rule(str),
    "tls": Rule(bool), "ca_file": Rule(str), "cert_file": Rule(str), "key_file": Rule(str),
    # MQTT's 16-bit keepalive; 0 turns it off. A few seconds is legal but a busy Pi then risks being
    # dropped by the broker for a missed PINGREQ (it gives 1.5 keepalives): 30 to 60 is the usual choice.
    "keepalive": Rule(int, lo=0, hi=65535),
    "discovery": Rule(bool), "discovery_prefix": Rule(str, nonempty=True),
    "discovery_mode": Rule(str, choices={"device", "entity"}),
    "uplink_topic": Rule(str),  # "" turns it off
    "downlink_topic": Rule(str, check=topic_problems),  # "" turns it off
    # packet ids are 16-bit (1..65535) and every message in flight holds one: the window stops
    # short of that, leaving ids for the status and discovery messages sent beside it
    "max_inflight": Rule(int, lo=1, hi=60000),
}
_EVENTS = {
    "full_pct": Rule(NUMBER, above=0, hi=100), "emptied_drop_pct": Rule(NUMBER, above=0, hi=100),
    "low_battery_mv": Rule(int, lo=2000, hi=4550),  # what the wire can carry (codec: 2000 + 10 mV steps)
}
_METRICS = {"listen": Rule(str, check=listen_problems)}
_REDIS = {
    "url": Rule(str, check=redis_url_problems), "username": Rule(str), "password_file": Rule(str),
    "registry_secret_file": Rule(str),
    "ca_file": Rule(str), "cert_file": Rule(str), "key_file": Rule(str),
    "sentinels": Rule(list, check=sentinel_problems), "sentinel_master": Rule(str, nonempty=True),
    "cluster": Rule(bool), "prefix": Rule(str, nonempty=True),
    "timeout_s": Rule(NUMBER, above=0, hi=60),
    "dedup_ttl_s": Rule(NUMBER, lo=1, hi=30 * DAY_S),  # whole seconds for Redis (EX): 1 at least
    "registry_poll_s": Rule(NUMBER, above=0, hi=3600),
}
_TOP = {"gateway": True, "source": True, "mqtt": False, "events": False, "metrics": False, "redis": False}
SCHEMA = {"gateway": _GATEWAY, "source": _SOURCE, "mqtt": _MQTT, "events": _EVENTS, "metrics": _METRICS, "redis": _REDIS}
for _cls, _schema in ((Mqtt, _MQTT), (Events, _EVENTS), (Redis, _REDIS), (Source, _SOURCE)):
    assert set(_schema) == set(_cls.__dataclass_fields__), _cls  # every setting in the schema, with its rule


def _check_table(table, schema, path, problems):
    """problems for table against schema; returns the table's valid entries (the rest are reported)."""
    good = {}
    for key in table:
        if key not in schema:
            problems.append("%s.%s: unknown key" % (path, key))
    for key, rule in schema.items():
        if key not in table:
            if rule.required:
                problems.append("%s.%s: missing" % (path, key))
            continue
        found = rule.problems("%s.%s" % (path, key), table[key])
        problems += found
        if not found:
            good[key] = table[key]
    return good


def _table(data, key, problems):
    """data[key] as a dict; anything else is a problem (TOML allows `mqtt = [1, 2]`)."""
    t = data.get(key, {})
    if isinstance(t, dict):
        return t
    problems.append("%s: must be a table ([%s])" % (key, key))
    return {}


def parse(data):
    """Validated Config from a parsed TOML dict; raises ConfigError listing every problem."""
    problems = []
    for key in data:
        if key not in _TOP:
            problems.append("%s: unknown table" % key)
    for key, required in _TOP.items():
        if required and key not in data:
            problems.append("%s: missing" % ("[[source]]" if key == "source" else "[%s]" % key))
    gw = _check_table(_table(data, "gateway", problems), _GATEWAY, "gateway", problems)
    raw_sources = data.get("source", [])
    if not isinstance(raw_sources, list):
        problems.append("source: must be an array of tables ([[source]])")
        raw_sources = []
    sources = []
    for i, s in enumerate(raw_sources):
        path = "source[%d]" % i
        if not isinstance(s, dict):
            problems.append("%s: must be a table" % path)
            continue
        s = _check_table(s, _SOURCE, path, problems)
        sources.append(Source(**dict({"name": "source%d" % i, "port": ""}, **s)))
    names = [s.name for s in sources]
    for n in sorted(set(names)):
        if names.count(n) > 1:
            problems.append("source: name %r used twice" % n)
    mq = _check_table(_table(data, "mqtt", problems), _MQTT, "mqtt", problems)
    if mq.get("password") and mq.get("password_file"):
        problems.append("mqtt.password_file: give password or password_file, not both")
    if (mq.get("cert_file") or mq.get("key_file")) and not mq.get("tls"):
        problems.append("mqtt.tls: cert_file/key_file need tls = true")
    ev = _check_table(_table(data, "events", problems), _EVENTS, "events", problems)
    met = _check_table(_table(data, "metrics", problems), _METRICS, "metrics", problems)
    rd = _check_table(_table(data, "redis", problems), _REDIS, "redis", problems)
    problems += shared_state_problems(rd)
    if problems:
        raise ConfigError(problems)
    return Config(
        gateway_id=gw["id"], site=gw["site"], registry=gw["registry"], state_dir=gw["state_dir"],
        sources=sources, mqtt=Mqtt(**mq), events=Events(**ev), redis=Redis(**rd),
        dedup_window_s=float(gw.get("dedup_window_s", Config.dedup_window_s)),
        status_interval_s=float(gw.get("status_interval_s", Config.status_interval_s)),
        metrics_listen=met.get("listen", ""), log_level=gw.get("log_level", Config.log_level),
        allow_volatile_state=gw.get("allow_volatile_state", False),
    )


def load(path):
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(["%s: no such file" % path]) from None
    except OSError as e:  # permission denied, a directory, ...
        raise ConfigError(["%s: cannot read: %s" % (path, e.strerror or e)]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(["%s: not valid TOML: %s" % (path, e)]) from None
    cfg = parse(data)
    base = os.path.dirname(os.path.abspath(path))  # relative paths are relative to the config file
    cfg.registry = os.path.join(base, cfg.registry)
    cfg.state_dir = os.path.join(base, cfg.state_dir)
    return cfg


def metrics_address(cfg):
    host, _, port = cfg.metrics_listen.rpartition(":")
    return host, int(port)


def mqtt_password(m):
    """The broker password: mqtt.password, or the first line of mqtt.password_file."""
    if m.password_file:
        with open(m.password_file) as f:
            return f.read().strip()
    return m.password


def apply_mqtt_settings(client, m):
    """Credentials and TLS from the [mqtt] table m on a paho client (Wi-Fi input, state recovery, planner)."""
    import ssl

    if m.username:
        client.username_pw_set(m.username, mqtt_password(m) or None)
    if m.tls:
        client.tls_set(ca_certs=m.ca_file or None, certfile=m.cert_file or None, keyfile=m.key_file or None,
                       cert_reqs=ssl.CERT_REQUIRED)


OTHERS = stat.S_IROTH | stat.S_IWOTH
GROUP_OR_OTHERS = stat.S_IRGRP | stat.S_IWGRP | OTHERS


def _readable(path, key, problems, secret=False, private=False):
    """Opens path as the gateway will; a secret must not be readable by other users, a private
    secret (a key to the shared state) not by its group either."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        mode = os.stat(path).st_mode
    except OSError as e:
        problems.append("%s: cannot read %s: %s" % (key, path, e.strerror or e))
        return None
    if private and mode & GROUP_OR_OTHERS:
        problems.append("%s: %s is readable by its group or other users; it holds a secret (chmod 600)" % (key, path))
    elif secret and mode & OTHERS:
        problems.append("%s: %s is readable by other users; it holds a secret (chmod 640)" % (key, path))
    return data


def check_files(cfg):
    """Every file the gateway will open, opened now: problems name the key and the file.
    The registry is checked by registry.load; the state dir must be writable."""
    import ssl

    problems = []
    m = cfg.mqtt
    if m.password_file:
        data = _readable(m.password_file, "mqtt.password_file", problems, secret=True)
        if data is not None and not data.strip():
            problems.append("mqtt.password_file: %s is empty" % m.password_file)
    for key, path, secret in (("mqtt.ca_file", m.ca_file, False), ("mqtt.cert_file", m.cert_file, False),
                              ("mqtt.key_file", m.key_file, True)):
        if path:
            _readable(path, key, problems, secret=secret)
    if m.tls and not problems:
        try:
            ctx = ssl.create_default_context(cafile=m.ca_file or None)
            if m.cert_file:
                ctx.load_cert_chain(m.cert_file, m.key_file or None)
        except (ssl.SSLError, OSError) as e:
            key = "mqtt.cert_file" if m.cert_file and "cafile" not in str(e) else "mqtt.ca_file"
            problems.append("%s: not usable for TLS (%s, %s): %s" % (key, m.ca_file or "system store", m.cert_file or "-", e))
    if cfg.redis.enabled:
        problems += _redis_file_problems(cfg.redis)
    problems += _state_dir_problems(cfg.state_dir)
    if not cfg.allow_volatile_state:
        problems += volatile_state_problems(cfg.state_dir)
    return problems


REGISTRY_SECRET_MIN = 32  # bytes: a 256-bit secret written as hex or base64 is longer


def _redis_file_problems(rc):
    """The password and the registry secret: present, readable, private, long enough to matter."""
    problems = []
    for key, path, least, what in (("redis.password_file", rc.password_file, 1, "is empty"),
                                   ("redis.registry_secret_file", rc.registry_secret_file, REGISTRY_SECRET_MIN,
                                    "holds fewer than %d characters (openssl rand -hex 32)" % REGISTRY_SECRET_MIN)):
        data = _readable(path, key, problems, private=True)
        if data is not None and len(data.strip()) < least:
            problems.append("%s: %s %s" % (key, path, what))
    for key, path in (("redis.ca_file", rc.ca_file), ("redis.cert_file", rc.cert_file), ("redis.key_file", rc.key_file)):
        if path:
            _readable(path, key, problems, private=key == "redis.key_file")
    return problems


def _state_dir_problems(path):
    existing = path
    while not os.path.isdir(existing):
        parent = os.path.dirname(existing)
        if parent == existing or (os.path.exists(existing) and not os.path.isdir(existing)):
            return ["gateway.state_dir: %s is not a directory" % existing]
        existing = parent
    if not os.access(existing, os.W_OK | os.X_OK):
        return ["gateway.state_dir: %s is not writable by this user (uid %d)" % (existing, os.getuid())]
    return []


def volatile_state_problems(path, mountinfo=None):
    """A state directory in RAM (tmpfs, ramfs: an SD-saving tweak) loses at a power cut every
    reading not yet published and every bin's counter, so frames heard before are accepted again
    (measured: 1,094 of 2,206 accepted readings lost, 4 of 8 replays accepted)."""
    found = config_rules.filesystem_of(path, mountinfo)
    if found is None or found[1] not in VOLATILE:
        return []
    return ["gateway.state_dir: %s is on a %s (mounted at %s), kept in RAM: a power cut loses every reading not yet "
            "published and the bins' frame counters (replayed frames are then accepted); put it on persistent storage "
            "(/var/lib/binlink), or set gateway.allow_volatile_state = true to accept that loss" % (path, found[1], found[0])]
