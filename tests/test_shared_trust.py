"""Nothing read from the shared state (Redis) is trusted as it stands (issue 18): a Redis writer who
swaps a bin's key, adds a bin, writes a value no gateway writes, raises a counter or pre-claims one
gets the entry refused and counted, and the gateway and every other bin go on; no forged reading is
published. Against a real redis-server with the ACL user docs/gateway.md sets up."""
import json
import os

import pytest

from binlink.gateway import registry
from binlink.gateway.metrics import Metrics
from binlink.gateway.shared_state import RETRY_S, SharedState
from binlink.wire import codec
from tests.harness import KEY, KEY2, wait_for
from tests.test_multi_gateway import (DEV_A, DEV_B, DEVICES, Site, admin, redis_server, reading, shared_settings,  # noqa: F401 - a fixture
                                      uplink_ids)

EVIL_KEY = bytes.fromhex("6576696c206b65792065766976696c21")  # an attacker's key (TEST KEY)
DEV_EVIL = 0xEE


def refused(metrics, reason):
    return metrics.readback_rejected.labels("redis", reason)._value.get()


class Gateway:
    """A SharedState as one gateway holds it, with a clock the test moves (outage retries)."""

    def __init__(self, server, name):
        self.now = 0.0
        self.metrics = Metrics()
        self.shared = SharedState(shared_settings(server, timeout_s=0.5), self.metrics, name, clock=lambda: self.now)

    def claim(self, device, fcnt, newest=None):
        return self.shared.claim(device, fcnt, "%064x" % fcnt, 3600, newest)


@pytest.fixture
def site_registry(tmp_path):
    path = str(tmp_path / "devices.toml")
    for dev, bin_id, key, depth, full in DEVICES:
        registry.add(path, dev, bin_id, key, depth, full)
    return registry.load(path)


@pytest.fixture
def writer(redis_server):
    return admin(redis_server, decode_responses=True)


def test_a_swapped_key_or_a_forged_bin_is_refused_as_forged(redis_server, writer, site_registry):
    gw = Gateway(redis_server, "gw0")
    assert gw.shared.merge(site_registry)[DEV_A].key == KEY
    sealed = writer.get("binlink:{0000a1}:device")
    mac, entry = sealed.split(" ", 1)
    entry = json.loads(entry)
    entry.update(key=EVIL_KEY.hex(), key_epoch=entry["key_epoch"] + 1)  # a newer epoch would win the merge
    writer.set("binlink:{0000a1}:device", "%s %s" % (mac, json.dumps(entry, sort_keys=True, separators=(",", ":"))))
    evil = dict(entry, device_id="%06x" % DEV_EVIL, bin_id="evil/#")
    writer.set("binlink:{0000ee}:device", "%s %s" % (mac, json.dumps(evil)))
    writer.sadd("binlink:devices", "0000ee", "not-an-id")
    writer.hset("binlink:retired", "0000b2", "bin-b 2026-01-01")  # a retirement would drop bin-b everywhere

    other = Gateway(redis_server, "gw1")
    merged = other.shared.merge(registry.Registry())  # a gateway whose file is empty: only the shared registry
    assert DEV_A not in merged and DEV_EVIL not in merged and DEV_B in merged and not merged.retired
    # counted at every read: the retirement is read by the push and by the load of a merge
    assert refused(other.metrics, "forged") == 4 and refused(other.metrics, "malformed") == 1
    assert other.shared.up
    assert gw.shared.merge(site_registry)[DEV_A].key == KEY  # a gateway whose file has bin-a seals it again
    assert other.shared.merge(registry.Registry())[DEV_A].key == KEY


def test_a_sealed_entry_is_still_held_to_the_registry_rules(redis_server, writer, site_registry):
    """A secret leaked or a bug: an entry sealed under the site's secret but breaking the file's rules
    (a 1-byte key, a bin id unfit for a topic, an entry moved to another device's key) is refused."""
    gw = Gateway(redis_server, "gw0")
    gw.shared.merge(site_registry)
    good = registry.device_entry(site_registry[DEV_A])
    for dev, entry in ((DEV_A, dict(good, key="00")), (DEV_B, dict(good, device_id="0000b2", bin_id="evil/#")),
                       (DEV_EVIL, good)):
        writer.set("binlink:{%06x}:device" % dev, gw.shared.seal("device", entry))
        writer.sadd("binlink:devices", "%06x" % dev)
    shared = gw.shared.load_registry()
    assert list(shared) == [0xC3] and refused(gw.metrics, "malformed") == 3  # bin-c untouched


def test_values_no_gateway_writes_are_refused_and_the_bin_goes_on(redis_server, writer, site_registry):
    """epoch `x`, fill `abc`, flags 999, a garbage claim, a counter of 2**32-1: each refused, counted;
    the next frame is claimed and the entry replaced; the other bins never notice."""
    gw = Gateway(redis_server, "gw0")
    a, b = site_registry[DEV_A], site_registry[DEV_B]
    assert gw.claim(a, 10, (10, 40.0, 0)) == ("ok", None)
    assert gw.claim(b, 10, (10, 40.0, 0)) == ("ok", None)

    writer.hset("binlink:{0000a1}:ctr", "epoch", "x")
    assert gw.shared.last(a) is None and refused(gw.metrics, "malformed") == 1
    assert gw.claim(a, 11, (11, 50.0, 0))[0] == "ok" and refused(gw.metrics, "counter") == 1
    assert gw.shared.last(a) == 11

    writer.hset("binlink:{0000a1}:bin", "fill", "abc")
    assert gw.claim(a, 12, (12, None, 0)) == ("ok", None) and refused(gw.metrics, "malformed") == 2
    writer.hset("binlink:{0000a1}:bin", mapping={"fill": "50", "flags": "999"})
    assert gw.claim(a, 13, (13, 60.0, 0)) == ("ok", None) and refused(gw.metrics, "malformed") == 3
    assert gw.claim(a, 14, (14, 70.0, 0)) == ("ok", (13, 60.0, 0))  # replaced by the claim of 13

    writer.set("binlink:{0000a1}:seen:0:15", "garbage")
    writer.set("binlink:{0000a1}:seen:0:16", "%064x:c" % 999)  # a well-formed pre-claim above the counter
    assert gw.claim(a, 15)[0] == "ok" and gw.claim(a, 16)[0] == "ok" and refused(gw.metrics, "claim") == 2

    writer.hset("binlink:{0000a1}:ctr", "fcnt", str(2**32 - 1))  # every frame of the bin a replay, fleet-wide
    assert gw.claim(a, 17)[0] == "ok" and refused(gw.metrics, "counter_ahead") == 1
    assert gw.claim(a, 17)[0] == "pending" and gw.claim(a, 5)[0] == "replay"  # replay protection holds
    assert gw.claim(b, 11, (11, 41.0, 0)) == ("ok", (10, 40.0, 0)) and gw.shared.up


def test_a_counter_raised_within_the_gap_refuses_at_most_that_many_frames(redis_server, writer, site_registry):
    """The bound: a counter up to MAX_FCNT_GAP above the frame's is what the fleet may really have
    reached while this gateway heard nothing; the bin's frames below it are replays until it passes."""
    gw = Gateway(redis_server, "gw0")
    a = site_registry[DEV_A]
    gw.claim(a, 10)
    writer.hset("binlink:{0000a1}:ctr", "fcnt", str(10 + codec.MAX_FCNT_GAP))
    assert gw.claim(a, 11)[0] == "replay"
    assert gw.claim(a, 11 + codec.MAX_FCNT_GAP)[0] == "ok"


def test_a_garbled_reply_is_redis_unavailable_never_a_crash(redis_server, writer, site_registry):
    gw = Gateway(redis_server, "gw0")
    a, b = site_registry[DEV_A], site_registry[DEV_B]
    admin(redis_server).hset("binlink:{0000a1}:ctr", mapping={"epoch": b"\xff\xfe", "fcnt": b"\xff"})  # not UTF-8
    assert gw.shared.last(a) is None and not gw.shared.up  # UnicodeDecodeError: unavailable, the local state decides
    assert gw.claim(b, 1) == ("local", None)
    gw.now += RETRY_S
    assert gw.claim(b, 2) == ("ok", None) and gw.shared.up


def test_redis_back_empty_gets_every_counter_and_an_old_frame_of_a_quiet_bin_is_refused(redis_server, writer,
                                                                                      site_registry):
    """bin-b is quiet: heard before the outage, not during it. Redis restarts empty, and later is
    flushed while it answers: both times gw0 pushes bin-b's counter too, so gw1, which never heard
    bin-b, refuses an old frame of it."""
    gw0 = Gateway(redis_server, "gw0")
    a, b = site_registry[DEV_A], site_registry[DEV_B]
    assert gw0.claim(b, 7)[0] == "ok" and gw0.claim(a, 7)[0] == "ok"
    redis_server.kill()
    assert gw0.claim(a, 8) == ("local", None)  # only bin-a advances during the outage
    redis_server.start()
    gw0.now += RETRY_S
    assert gw0.shared.check() and gw0.metrics.shared_up._value.get() == 1
    gw1 = Gateway(redis_server, "gw1")
    assert gw1.claim(b, 7)[0] == "replay" and gw1.claim(b, 5)[0] == "replay" and gw1.claim(a, 8)[0] == "replay"

    writer.flushall()
    assert gw0.shared.registry_changed()  # noticed at its next poll: the registry is pushed again too
    assert gw1.claim(b, 6)[0] == "replay" and gw1.claim(b, 8)[0] == "ok"


def test_forged_registry_entries_publish_nothing_and_the_site_goes_on(tmp_path, broker, redis_server, writer,
                                                                       subscriber):
    """Two gateway processes: a Redis writer swaps bin-a's key for its own and adds a bin `evil/#`;
    frames made with that key are refused, genuine ones published, nothing published for evil/#."""
    site = Site(tmp_path, broker, redis_server, 1)
    try:
        site.hear(reading(DEV_A, 1), [0])
        wait_for(lambda: uplink_ids(subscriber) == ["0000a1:0:1"], what="bin-a's first reading")
        mac, body = writer.get("binlink:{0000a1}:device").split(" ", 1)
        entry = dict(json.loads(body), key=EVIL_KEY.hex(), key_epoch=1)
        writer.set("binlink:{0000a1}:device", "%s %s" % (mac, json.dumps(entry)))
        writer.set("binlink:{0000ee}:device", "%s %s" % (mac, json.dumps(dict(entry, device_id="0000ee", bin_id="evil/#"))))
        writer.sadd("binlink:devices", "0000ee")
        writer.incr("binlink:registry:version")
        site.add()  # a gateway started now reads the poisoned registry
        for g in site.gws:
            wait_for(lambda: g.metric("binlink_readback_rejected_total", source="redis", reason="forged") >= 1,
                     what="%s refuses the forged entries" % g.gateway_id)
        site.hear(reading(DEV_A, 2, key=EVIL_KEY), [0, 1])  # the fire alarm that never was
        site.hear(codec.encode_reading(EVIL_KEY, DEV_EVIL, 1, 100, 20, 3700, 0, 5, 5), [0, 1])
        site.hear(reading(DEV_A, 2), [0, 1])
        wait_for(lambda: "0000a1:0:2" in uplink_ids(subscriber), what="bin-a's genuine reading")
        site.settle(subscriber)
        assert uplink_ids(subscriber) == ["0000a1:0:1", "0000a1:0:2"]
        assert [e["distance_mm"] for e in subscriber.events() if e["message_id"] == "0000a1:0:2"] == [700]
        assert all(g.metric("binlink_shared_state_up") == 1 for g in site.gws)
        assert not [t for t, _ in subscriber.on("") if "evil" in t]
        assert sum(g.metric("binlink_frames_rejected_total") for g in site.gws) >= 4  # 2 frames, 2 gateways
    finally:
        site.close()


def test_registry_push_refuses_a_world_readable_file_and_names_a_damaged_entry(tmp_path, redis_server, writer):
    import subprocess

    from tests.harness import BINLINK

    conf, path = tmp_path / "gw.toml", tmp_path / "devices.toml"
    conf.write_text('[gateway]\nid = "g"\nsite = "s"\nregistry = "%s"\nstate_dir = "%s"\n[[source]]\nport = "/dev/null"\n%s'
                    % (path, tmp_path / "state", redis_server.config()))
    registry.add(str(path), DEV_A, "bin-a", KEY, 1200, 200)
    registry.add(str(path), DEV_B, "bin-b", KEY2, 1000, 100)

    def push():
        return subprocess.run([os.path.abspath(BINLINK), "registry", "--config", str(conf), "push"], capture_output=True,
                              text=True)

    writer.set("binlink:{0000a1}:device", "deadbeef {}")  # a damaged shared entry: replaced, said
    r = push()
    assert r.returncode == 0 and "2 entries written" in r.stdout and "not trusted" in r.stderr, r.stderr
    os.chmod(path, 0o644)
    r = push()
    assert r.returncode == 2 and "readable by other users" in r.stderr and "Traceback" not in r.stderr
    os.chmod(path, 0o600)
    path.write_text(path.read_text().replace('bin_id = "bin-b"', 'bin_id = "bin/b"'))
    r = push()
    assert r.returncode == 2 and "device[1].bin_id: 'bin/b'" in r.stderr and "Traceback" not in r.stderr, r.stderr
