"""The gateway's config schema: every bounded value refused outside its bounds, naming its key path and
the allowed range, at `binlink gateway check-config` and at start (issue 17)."""
import copy
import math
import os
import struct
import subprocess

import pytest
from hypothesis import given, strategies as st

from binlink.gateway import cli, config, config_rules, mqtt_wire, registry
from binlink.gateway.config import SCHEMA, ConfigError
from tests.harness import BINLINK

BASE = {"gateway": {"id": "g", "site": "s", "registry": "r", "state_dir": "d"}, "source": [{"port": "/dev/x"}]}


def with_value(table, key, value):
    """BASE with table.key set (source: the first [[source]]) and the key path a problem names."""
    doc = copy.deepcopy(BASE)
    if table == "source":
        doc["source"][0][key] = value
        return doc, "source[0].%s" % key
    doc.setdefault(table, {})[key] = value
    return doc, "%s.%s" % (table, key)


def problems(doc):
    try:
        config.parse(doc)
    except ConfigError as e:
        return e.problems
    return []


RANGED = sorted((t, k) for t, keys in SCHEMA.items() for k, rule in keys.items() if rule.hi is not None)
CHOICES = sorted((t, k) for t, keys in SCHEMA.items() for k, rule in keys.items() if rule.choices is not None)
NONEMPTY = sorted((t, k) for t, keys in SCHEMA.items() for k, rule in keys.items() if rule.nonempty)


def is_float(rule):
    return isinstance(rule.typ, tuple)


def inside(rule):
    lo = rule.lo if rule.above is None else math.floor(rule.above) + 1
    ints = st.integers(lo, rule.hi)
    if not is_float(rule):
        return ints
    low = rule.lo if rule.above is None else rule.above
    return ints | st.floats(low, rule.hi, exclude_min=rule.above is not None)


def outside(rule):
    lo = rule.lo if rule.above is None else rule.above  # above: the bound itself is outside too
    below = st.integers(max_value=lo - 1 if rule.above is None else lo)
    ints = below | st.integers(min_value=rule.hi + 1)
    if not is_float(rule):
        return ints
    floats = (st.floats(max_value=lo, exclude_max=rule.above is None, allow_infinity=True)
              | st.floats(min_value=rule.hi, exclude_min=True, allow_infinity=True))
    return ints | floats | st.just(math.nan)


def test_every_number_has_bounds_or_choices():
    """So inf, nan and any other runaway value is refused (TOML has them all)."""
    for table, keys in SCHEMA.items():
        for key, rule in keys.items():
            if rule.typ in (int, config.NUMBER):
                assert rule.hi is not None or rule.choices, "%s.%s has no bounds" % (table, key)


@given(st.data())
def test_any_value_in_range_is_accepted(data):
    table, key = data.draw(st.sampled_from(RANGED))
    value = data.draw(inside(SCHEMA[table][key]))
    doc, _ = with_value(table, key, value)
    assert problems(doc) == []
    cfg = config.parse(doc)
    got = {"gateway": lambda: {"dedup_window_s": cfg.dedup_window_s, "status_interval_s": cfg.status_interval_s}.get(key),
           "source": lambda: getattr(cfg.sources[0], key), "mqtt": lambda: getattr(cfg.mqtt, key),
           "events": lambda: getattr(cfg.events, key), "redis": lambda: getattr(cfg.redis, key)}[table]()
    assert got == value


@given(st.data())
def test_any_value_out_of_range_is_refused_naming_its_key_and_the_range(data):
    table, key = data.draw(st.sampled_from(RANGED))
    rule = SCHEMA[table][key]
    value = data.draw(outside(rule))
    doc, path = with_value(table, key, value)
    shown = repr(value) if isinstance(value, float) else str(value)
    assert problems(doc) == ["%s: %s is out of range (%s)" % (path, shown, rule.allowed())]


@pytest.mark.parametrize("table,key", CHOICES)
def test_a_value_not_in_the_choices_is_refused(table, key):
    rule = SCHEMA[table][key]
    for good in rule.choices:
        assert problems(with_value(table, key, good)[0]) == []
    bad = 1234 if rule.typ is int else "verbose"
    doc, path = with_value(table, key, bad)
    (problem,) = problems(doc)
    assert problem.startswith("%s: %r is not one of " % (path, bad))


@pytest.mark.parametrize("table,key", NONEMPTY)
@pytest.mark.parametrize("blank", ["", "   "])
def test_an_empty_name_host_or_path_is_refused(table, key, blank):
    doc, path = with_value(table, key, blank)
    assert problems(doc) == ["%s: must not be empty" % path]


@pytest.mark.parametrize("table,key,value,problem", [
    ("mqtt", "keepalive", -5, "mqtt.keepalive: -5 is out of range (0..65535)"),
    ("mqtt", "keepalive", 70000, "mqtt.keepalive: 70000 is out of range (0..65535)"),
    ("mqtt", "port", 0, "mqtt.port: 0 is out of range (1..65535)"),
    ("mqtt", "max_inflight", 65535, "mqtt.max_inflight: 65535 is out of range (1..60000)"),
    ("gateway", "dedup_window_s", -1, "gateway.dedup_window_s: -1 is out of range (0 < value <= 86400)"),
    ("gateway", "dedup_window_s", 0.0, "gateway.dedup_window_s: 0.0 is out of range (0 < value <= 86400)"),
    ("redis", "dedup_ttl_s", 0.5, "redis.dedup_ttl_s: 0.5 is out of range (1..2592000)"),
    ("events", "full_pct", 101, "events.full_pct: 101 is out of range (0 < value <= 100)"),
    ("events", "low_battery_mv", 33, "events.low_battery_mv: 33 is out of range (2000..4550)"),
    ("metrics", "listen", "127.0.0.1:70000", "metrics.listen: port 70000 is out of range (1..65535)"),
    ("metrics", "listen", "127.0.0.1:0", "metrics.listen: port 0 is out of range (1..65535)"),
    ("metrics", "listen", "9108", "metrics.listen: expected HOST:PORT, got '9108'"),
    ("redis", "url", "redis://localhost:0/0", "redis.url: port 0 is out of range (1..65535)"),
    ("redis", "url", "redis://localhost:65536/0", "redis.url: port 65536 is out of range (1..65535)"),
    ("redis", "url", "redis://localhost:x/0", "redis.url: port 'x' is not a number"),
    ("redis", "sentinels", ["a:26379", "b:0", 7], "redis.sentinels[1]: port 0 is out of range (1..65535)"),
    ("redis", "sentinels", ["a:26379", 7], "redis.sentinels[1]: expected HOST:PORT, got 7"),
    ("redis", "sentinels", "a:26379", "redis.sentinels: expected a list, got 'a:26379'"),
    ("mqtt", "keepalive", True, "mqtt.keepalive: expected an integer, got a boolean"),
])
def test_examples_name_the_key_and_what_is_allowed(table, key, value, problem):
    assert problem in problems(with_value(table, key, value)[0])


AUTH = {"username": "binlink", "password_file": "/etc/binlink/redis.password",
        "registry_secret_file": "/etc/binlink/registry.secret"}


def with_redis(**table):
    doc = copy.deepcopy(BASE)
    doc["redis"] = table
    return doc


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://localhost:6380/0", "redis://[::1]:6379/0",
                                 "redis://localhost/0", "unix:///run/redis.sock", "rediss://10.0.0.5:6380/0"])
def test_redis_urls_with_a_port_in_range_are_accepted(url):
    assert problems(with_redis(url=url, **AUTH)) == []


def test_a_shared_state_needs_authentication_and_a_registry_secret():
    assert problems(with_redis(url="redis://127.0.0.1:6379/0")) == [
        "redis.username: missing: a shared state needs authentication (an ACL user, docs/gateway.md §5)",
        "redis.password_file: missing: a shared state needs authentication (the ACL user's password, in a file of mode 0600)",
        "redis.registry_secret_file: missing: a shared state needs the site's registry secret (the same file, "
        "mode 0600, on every gateway)"]
    assert problems(with_redis(url="", **AUTH)) == []  # no shared state: nothing needed


@pytest.mark.parametrize("table,problem", [
    ({"url": "redis://10.0.0.5:6379/0"}, "redis.url: redis://10.0.0.5:6379/0 is not on this machine: use rediss:// (TLS)"),
    ({"url": "redis://redis.city.example/0"}, "redis.url: redis://redis.city.example/0 is not on this machine"),
    ({"sentinels": ["127.0.0.1:26379", "10.0.0.6:26379"]}, "redis.sentinels: 10.0.0.6:26379 not on this machine: TLS needs redis.ca_file"),
])
def test_a_shared_state_off_this_machine_needs_tls(table, problem):
    found = problems(with_redis(**table, **AUTH))
    assert len(found) == 1 and found[0].startswith(problem), found
    assert problems(with_redis(**table, **AUTH, ca_file="/etc/binlink/redis-ca.crt")) == ([] if "sentinels" in table else found)


@pytest.mark.parametrize("mode,text,key,problem", [
    (0o640, "pw", "password_file", "is readable by its group or other users; it holds a secret (chmod 600)"),
    (0o604, "pw", "password_file", "is readable by its group or other users"),
    (0o600, "", "password_file", "is empty"),
    (0o660, "s" * 64, "registry_secret_file", "is readable by its group or other users"),
    (0o600, "short", "registry_secret_file", "holds fewer than 32 characters"),
    (None, "", "registry_secret_file", "cannot read"),
])
def test_check_config_refuses_loose_or_empty_redis_secrets_naming_the_key(tmp_path, mode, text, key, problem):
    files = {}
    for k, content in (("password_file", "pw"), ("registry_secret_file", "s" * 64)):
        path = tmp_path / k
        files[k] = path
        if k == key and mode is None:
            continue
        path.write_text(text if k == key else content)
        os.chmod(path, mode if k == key else 0o600)
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[gateway]\nid = "g"\nsite = "s"\nregistry = "r.toml"\nstate_dir = "st"\n[[source]]\nport = "/dev/x"\n'
                   '[redis]\nurl = "redis://127.0.0.1:1/0"\nusername = "binlink"\npassword_file = "%s"\n'
                   'registry_secret_file = "%s"\n' % (files["password_file"], files["registry_secret_file"]))
    r = subprocess.run([BINLINK, "gateway", "check-config", str(cfg)], capture_output=True, text=True, timeout=30)
    line = [x for x in r.stderr.splitlines() if x.startswith("config error: redis.%s: " % key)]
    assert r.returncode == 2 and len(line) == 1 and str(files[key]) in line[0] and problem in line[0], r.stderr
    assert "Traceback" not in r.stderr


def test_the_keepalive_bounds_are_what_connect_can_carry():
    """The client packs keepalive in 16 bits: the schema's range is exactly what it can send."""
    rule = config.SCHEMA["mqtt"]["keepalive"]
    for ok in (rule.lo, rule.hi):
        mqtt_wire.Session._connect_packet("c", ok, "", "", None)
    for bad in (rule.lo - 1, rule.hi + 1):
        with pytest.raises(struct.error):
            mqtt_wire.Session._connect_packet("c", bad, "", "", None)


def test_the_window_leaves_packet_ids_for_status_and_discovery():
    """MQTT packet ids are 16-bit and never 0 (MQTT 3.1.1, 2.3.1): 65535 can be in flight at most.
    A full window must not take them all: status, discovery and SUBSCRIBE need theirs too."""
    ids = 2**16 - 1
    rule = config.SCHEMA["mqtt"]["max_inflight"]
    assert rule.lo == 1 and rule.hi < ids
    assert problems(with_value("mqtt", "max_inflight", ids)[0]) != []


@pytest.mark.parametrize("body,problem", [
    ("[mqtt]\nkeepalive = -5\n", "mqtt.keepalive: -5 is out of range (0..65535)"),
    ("[gateway]\ndedup_window_s = -1\n", "gateway.dedup_window_s: -1 is out of range (0 < value <= 86400)"),
    ('[mqtt]\nhost = ""\n', "mqtt.host: must not be empty"),
    ("[[source]]\nport = \"/dev/y\"\nbaud = 1234\n", "source[1].baud: 1234 is not one of"),
])
def test_check_config_and_start_refuse_an_out_of_range_value_naming_the_key(tmp_path, body, problem):
    head = '[gateway]\nid = "g"\nsite = "s"\nregistry = "r.toml"\nstate_dir = "st"\n[[source]]\nport = "/dev/x"\n'
    if body.startswith("[gateway]"):  # the same table once
        head = head.replace("[gateway]\n", "[gateway]\n" + body.split("\n", 1)[1], 1)
        body = ""
    cfg = tmp_path / "gw.toml"
    cfg.write_text(head + body)
    for args in (["gateway", "check-config", str(cfg)], ["gateway", "--config", str(cfg)]):
        r = subprocess.run([BINLINK, *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "config error: " + problem in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr


# a state directory in RAM -------------------------------------------------------------------
# mountinfo lines: id parent major:minor root MOUNT-POINT options [optional fields] - FSTYPE source options
FAKE_MOUNTS = """\
22 1 8:2 / / rw,relatime shared:1 - ext4 /dev/mmcblk0p2 rw
30 22 0:25 / /run rw,nosuid shared:5 - tmpfs tmpfs rw,size=189524k,mode=755
31 22 8:1 / /var/lib rw,relatime shared:7 - ext4 /dev/sda1 rw
32 31 0:40 / /var/lib/binlink-ram rw,relatime - tmpfs tmpfs rw,size=16m
33 31 0:41 / /var/lib/ramdisk rw,relatime master:3 - ramfs ramfs rw
34 31 0:42 / /var/lib/my\\040state rw,relatime - tmpfs tmpfs rw
35 22 0:43 / /mnt rw,relatime - tmpfs tmpfs rw
36 22 8:3 / /mnt rw,relatime - ext4 /dev/sdb1 rw
"""


@pytest.fixture
def mounts(tmp_path, monkeypatch):
    """config_rules reads this table instead of /proc/self/mountinfo."""
    path = tmp_path / "mountinfo"
    path.write_text(FAKE_MOUNTS)
    monkeypatch.setattr(config_rules, "MOUNTINFO", str(path))
    return path


@pytest.mark.parametrize("state_dir,found", [
    ("/var/lib/binlink", ("/var/lib", "ext4")),  # the longest mount point that is a prefix wins, not "/"
    ("/var/lib/binlink-ram", ("/var/lib/binlink-ram", "tmpfs")),
    ("/var/lib/binlink-ramx", ("/var/lib", "ext4")),  # whole components: /var/lib/binlink-ram is no prefix of it
    ("/var/lib/ramdisk/state", ("/var/lib/ramdisk", "ramfs")),
    ("/var/lib/my state/x", ("/var/lib/my state", "tmpfs")),  # \040 in mountinfo is a space
    ("/run/binlink", ("/run", "tmpfs")),
    ("/mnt/state", ("/mnt", "ext4")),  # stacked on one point: the last mount is the one seen
    ("/srv/binlink", ("/", "ext4")),
])
def test_the_filesystem_of_a_state_dir_is_its_longest_mount_point_prefix(state_dir, found):
    assert config_rules.mount_of(state_dir, FAKE_MOUNTS) == found


def test_a_state_dir_not_made_yet_is_on_its_nearest_existing_parents_filesystem(tmp_path, mounts):
    (tmp_path / "ram").mkdir()
    mounts.write_text(FAKE_MOUNTS + "40 22 0:50 / %s rw - tmpfs tmpfs rw\n" % (tmp_path / "ram"))
    assert config_rules.filesystem_of(str(tmp_path / "ram/not/made/yet")) == (str(tmp_path / "ram"), "tmpfs")
    (tmp_path / "link").symlink_to(tmp_path / "ram")  # a symlink into RAM is in RAM
    assert config_rules.filesystem_of(str(tmp_path / "link/state")) == (str(tmp_path / "ram"), "tmpfs")
    assert config_rules.filesystem_of(str(tmp_path / "disk/state"))[1] != "tmpfs"


def test_no_mount_table_no_problem(tmp_path, monkeypatch):
    monkeypatch.setattr(config_rules, "MOUNTINFO", str(tmp_path / "absent"))  # not Linux: nothing to say
    assert config_rules.filesystem_of("/run/binlink") is None and config.volatile_state_problems("/run/binlink") == []


def volatile_config(tmp_path, state_dir, allow=None):
    if not (tmp_path / "r.toml").exists():
        registry.add(str(tmp_path / "r.toml"), 0xA1, "bin-a", bytes(range(16)), 1200, 200)
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[gateway]\nid = "g"\nsite = "s"\nregistry = "r.toml"\nstate_dir = "%s"\n%s[[source]]\nport = "/dev/x"\n'
                   % (state_dir, "" if allow is None else "allow_volatile_state = %s\n" % str(allow).lower()))
    return str(cfg)


@pytest.mark.parametrize("allow", [None, False])
def test_check_config_and_start_refuse_a_state_dir_in_ram_naming_the_key_and_filesystem(tmp_path, mounts, capsys, allow):
    """tmpfs/ramfs state: a power cut lost 1,094 of 2,206 accepted readings and let 4 of 8 replays in."""
    state = tmp_path / "st"
    state.mkdir()
    mounts.write_text(FAKE_MOUNTS + "40 22 0:50 / %s rw - tmpfs tmpfs rw\n" % state)
    path = volatile_config(tmp_path, state, allow)
    for args in (["gateway", "check-config", path], ["gateway", "--config", path]):
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err
        line = [x for x in err.splitlines() if x.startswith("config error: gateway.state_dir: ")]
        assert len(line) == 1, (args, err)
        assert "%s is on a tmpfs (mounted at %s)" % (state, state) in line[0]
        assert "a power cut loses every reading not yet published" in line[0] and "counters" in line[0]
        assert "gateway.allow_volatile_state = true" in line[0]


def test_a_state_dir_in_ram_is_accepted_when_allowed_and_a_persistent_one_always(tmp_path, mounts, capsys):
    state = tmp_path / "st"
    state.mkdir()
    mounts.write_text(FAKE_MOUNTS + "40 22 0:50 / %s rw - ramfs ramfs rw\n" % state)
    assert cli.main(["gateway", "check-config", volatile_config(tmp_path, state, True)]) == 0, capsys.readouterr().err
    mounts.write_text(FAKE_MOUNTS + "40 22 8:9 / %s rw - ext4 /dev/sdc1 rw\n" % tmp_path)
    assert cli.main(["gateway", "check-config", volatile_config(tmp_path, state)]) == 0, capsys.readouterr().err
    assert config.parse(BASE).allow_volatile_state is False


# --- check-config tries what it names (issue 22) ------------------------------------------------------

def _site(tmp_path, mqtt="", port=None, source=None):
    """A config whose registry is valid and state dir writable: only the part under test can fail."""
    reg = tmp_path / "devices.toml"
    registry.provision(str(reg), "park-1", 1200, 200)
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[gateway]\nid = "g"\nsite = "s"\nregistry = "%s"\nstate_dir = "%s"\nallow_volatile_state = true\n'
                   '[[source]]\nport = "%s"\n[mqtt]\nhost = "127.0.0.1"\nport = %d\n%s\n'
                   % (reg, tmp_path / "state", source or os.devnull, port or 1, mqtt))
    cfg.chmod(0o640)
    return cfg


def check(*args):
    r = subprocess.run([BINLINK, "gateway", "check-config", *map(str, args)], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr
    return r


def test_check_config_connects_to_the_broker(tmp_path, broker):
    r = check(_site(tmp_path, port=broker.port))
    assert r.returncode == 0 and ": ok (" in r.stdout and "warning" not in r.stderr, r.stdout + r.stderr


def test_a_broker_nobody_answers_on_is_a_warning_and_offline_skips_it(tmp_path):
    from binlink.sim.broker import free_port

    cfg = _site(tmp_path, port=free_port())
    r = check(cfg)
    assert r.returncode == 0 and "warning: mqtt: cannot reach the broker at 127.0.0.1:" in r.stderr, r.stderr
    r = check("--offline", cfg)
    assert r.returncode == 0 and "broker not checked: --offline" in r.stdout and "mqtt" not in r.stderr


def test_credentials_the_broker_refuses_are_an_error(tmp_path):
    from binlink.sim.broker import Mosquitto

    b = Mosquitto()
    pw = os.path.join(b.dir, "passwd")
    subprocess.run(["mosquitto_passwd", "-b", "-c", pw, "gateway", "right-test-password"], check=True, capture_output=True)
    os.chmod(pw, 0o644)
    with open(b.conf, "a") as f:
        f.write("password_file %s\nallow_anonymous false\n" % pw)
    b.start()
    try:
        secret = tmp_path / "mqtt-password"
        secret.write_text("wrong-test-password\n")
        secret.chmod(0o600)
        cfg = _site(tmp_path, 'username = "gateway"\npassword_file = "%s"\n' % secret, port=b.port)
        r = check(cfg)
        assert r.returncode == 2 and "the broker at 127.0.0.1:%d refused user 'gateway'" % b.port in r.stderr, r.stderr
        assert "wrong-test-password" not in r.stdout + r.stderr
        secret.write_text("right-test-password\n")
        assert check(cfg).returncode == 0
    finally:
        b.stop()


def test_an_inline_password_in_a_world_readable_config_is_refused(tmp_path):
    cfg = _site(tmp_path, 'username = "u"\npassword = "inline-test-password"\n')
    cfg.chmod(0o644)
    r = check("--offline", cfg)
    assert r.returncode == 2 and "mqtt.password: written in %s, which is readable by other users" % cfg in r.stderr
    assert "inline-test-password" not in r.stderr
    cfg.chmod(0o640)
    assert check("--offline", cfg).returncode == 0


def test_a_missing_serial_port_is_a_warning_naming_the_source(tmp_path):
    r = check("--offline", _site(tmp_path, source="/dev/serial/by-id/usb-not-plugged"))
    assert r.returncode == 0 and "warning: source[0].port: /dev/serial/by-id/usb-not-plugged does not exist" in r.stderr


def test_a_state_dir_that_cannot_be_created_is_an_error(tmp_path):
    cfg = _site(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "state"), str(blocker / "state")))
    r = check("--offline", cfg)
    assert r.returncode == 2 and "gateway.state_dir: %s is not a directory" % blocker in r.stderr, r.stderr
    if os.geteuid() != 0:  # root may write anywhere: tests/test_installed.py checks as the service user
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        cfg.write_text(cfg.read_text().replace(str(blocker / "state"), str(ro / "state")))
        r = check("--offline", cfg)
        assert r.returncode == 2 and "cannot create %s in %s" % (ro / "state", ro) in r.stderr
    assert not (tmp_path / "state").exists()  # check-config leaves nothing behind
