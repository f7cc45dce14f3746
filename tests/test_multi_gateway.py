"""Several gateways acting as one through a real redis-server, with a real Mosquitto, each gateway
its own process reading its own pseudo-terminal: overlapping coverage, a gateway SIGKILLed, Redis
killed and restarted, a gateway added later, a bin re-keyed while frames flow, a replay carried
from one gateway to another."""
import collections
import os
import re
import shutil
import subprocess
import threading
import time
import tomllib

import pytest
import redis

from binlink.wire import codec, framing
from binlink.sim.serial_link import PtyLink
from tests.harness import BINLINK, KEY, KEY2, REDIS_PASSWORD as PASSWORD, GatewayProcess, RedisServer, key_from_key_file, wait_for
from tests.test_gateway_tls import pki  # noqa: F401 - the test CA and server certificate (a fixture)

KEY3 = bytes.fromhex("5445535420b1e57e57206b65792d3333")  # TEST KEY
KEYM = bytes.fromhex("5445535420b1e57e57206b65792d4d4d")  # TEST KEY
DEV_A, DEV_B, DEV_C, DEV_M = 0xA1, 0xB2, 0xC3, 0xD4
DEVICES = [(DEV_A, "bin-a", KEY, 1200, 200), (DEV_B, "bin-b", KEY2, 1000, 100), (DEV_C, "bin-c", KEY3, 1000, 100)]
MARKER = (DEV_M, "marker", KEYM, 1200, 200)  # a bin of the tests' own: see Site.settle
KEYS = {DEV_A: KEY, DEV_B: KEY2, DEV_C: KEY3, DEV_M: KEYM}


def reading(dev, n, dist=700, key=None):
    return codec.encode_reading(key or KEYS[dev], dev, n, dist, 20, 3700, 0, 5, 5)


def shared_settings(server, **kw):
    """The same [redis] table as SharedState takes it, for tests that drive it directly."""
    from binlink.gateway.config import Redis

    return Redis(**{**tomllib.loads(server.config())["redis"], **kw})


def admin(server, **kw):
    """A client of the test's own (the ACL user): what a Redis writer could do, the tests do with it."""
    return redis.Redis(port=server.port, username="binlink", password=PASSWORD, **kw)


@pytest.fixture
def redis_server(tmp_path):
    r = RedisServer(tmp_path).start()
    yield r
    r.stop()


class Site:
    """n gateways, each with its own radio (pty), state, registry file copy and metrics port."""

    def __init__(self, tmp_path, broker, redis_server, n, ttl_s=3600, devices=DEVICES + [MARKER]):
        self.tmp = tmp_path
        self.broker = broker
        self.redis = redis_server
        self.links, self.gws = [], []
        self.marker_fcnt = 0
        for i in range(n):
            self.add(ttl_s, devices)

    def add(self, ttl_s=3600, devices=DEVICES + [MARKER], start=True, extra=None):
        i = len(self.gws)
        link = PtyLink(str(self.tmp / ("radio-gw%d" % i)))
        if extra is None:
            extra = self.redis.config(ttl_s) if self.redis else ""
        gw = GatewayProcess(self.tmp / ("gw%d" % i), self.broker.port, [("radio0", link.link, "raw")], devices=devices,
                            gateway_id="gw%d" % i, extra=extra)
        self.links.append(link)
        self.gws.append(gw)
        if start:
            gw.start()
        return gw, link

    def hear(self, frame, which):
        """The frame reaches the radios of these gateways (coverage)."""
        for i in which:
            self.links[i].write(framing.frame(frame))

    def total(self, name, **labels):
        return sum(g.metric(name, **labels) for g in self.gws if g.alive())

    def settle(self, subscriber):
        """Proves that everything the live gateways published so far has reached subscriber: each
        is sent a reading of the marker bin that it alone hears, and its uplink is waited for. A
        gateway reads its radio in order and publishes its outbox in order on one connection, so
        whatever it published before the marker arrived before the marker did."""
        for i, g in enumerate(self.gws):
            if not g.alive():
                continue
            self.marker_fcnt += 1
            mid = "%06x:0:%d" % (DEV_M, self.marker_fcnt)
            self.hear(reading(DEV_M, self.marker_fcnt), [i])
            wait_for(lambda: mid in [e["message_id"] for e in subscriber.events()], what="gw%d's marker %s" % (i, mid))

    def close(self):
        for g in self.gws:
            if g.alive():
                g.kill()
        for link in self.links:
            link.close()


@pytest.fixture
def site3(tmp_path, broker, redis_server):
    s = Site(tmp_path, broker, redis_server, 3)
    yield s
    s.close()


def readings(subscriber):
    """The uplink events of the bins under test (not the marker's)."""
    return [e for e in subscriber.events() if e["bin_id"] != "marker"]


def uplink_ids(subscriber):
    return [e["message_id"] for e in readings(subscriber)]


def confirmed(redis_server, message_ids):
    """True when every one of these readings' claims in Redis is confirmed (":c"): the claimer has
    it on disk, and no peer can take it over and publish it a second time (TAKEOVER needs ":p")."""
    r = admin(redis_server, decode_responses=True)
    keys = ["binlink:{%s}:seen:%s:%s" % tuple(m.split(":")) for m in message_ids]
    return all(v is not None and v.endswith(":c") for v in r.mget(keys))


def test_overlapping_coverage_publishes_each_reading_once(site3, subscriber):
    """bin-a is heard by gw0 and gw1, bin-b by all three, bin-c by gw2 alone."""
    coverage = {DEV_A: (0, 1), DEV_B: (0, 1, 2), DEV_C: (2,)}
    for n in range(1, 41):
        dist = 990 if n % 10 == 0 else 1000 - 80 * (n % 10)  # fills to ~90 %, emptied every 10th reading
        for dev, which in coverage.items():
            site3.hear(reading(dev, n, dist), which)
    wait_for(lambda: len(set(uplink_ids(subscriber))) == 120, timeout=60, what="120 readings")
    wait_for(lambda: site3.total("binlink_duplicates_total") == 40 + 80, what="every extra reception counted")
    wait_for(lambda: confirmed(site3.redis, uplink_ids(subscriber)), what="every claim confirmed: no takeover to come")
    site3.settle(subscriber)  # anything published twice has arrived by now
    ids = uplink_ids(subscriber)
    assert len(ids) == len(set(ids)) == 120
    emptied = [e["message_id"] for e in subscriber.events("emptied")]
    assert len(emptied) == len(set(emptied)) == 3 * 4  # once per pickup, not once per gateway
    assert site3.total("binlink_frames_rejected_total") == 0
    by_bin = collections.Counter(e["bin_id"] for e in readings(subscriber))
    assert by_bin == {"bin-a": 40, "bin-b": 40, "bin-c": 40}
    assert {e["gateway"] for e in readings(subscriber) if e["bin_id"] == "bin-c"} == {"gw2"}


def test_frame_recorded_at_one_gateway_and_replayed_at_another_is_refused(tmp_path, broker, redis_server, subscriber):
    site = Site(tmp_path, broker, redis_server, 2, ttl_s=1)
    try:
        recorded = reading(DEV_A, 5)
        site.hear(recorded, [0])
        site.hear(reading(DEV_A, 6), [0])
        wait_for(lambda: len(uplink_ids(subscriber)) == 2, what="2 readings via gw0")
        r = admin(redis_server)
        # past the dedup TTL (1 s): no longer a late copy of the same reception
        wait_for(lambda: not r.exists("binlink:{0000a1}:seen:0:5"), what="the claim of counter 5 expired")
        site.hear(recorded, [1])  # gw1 has never heard bin-a
        wait_for(lambda: site.gws[1].metric("binlink_frames_rejected_total", reason="replay") == 1, what="replay at gw1")
        site.hear(reading(DEV_A, 7), [1])
        wait_for(lambda: len(uplink_ids(subscriber)) == 3, what="the next real reading via gw1")
        site.settle(subscriber)
        assert sorted(uplink_ids(subscriber)) == ["0000a1:0:5", "0000a1:0:6", "0000a1:0:7"]
    finally:
        site.close()


def _stream(site, frames_by_n, which, pause=0.01):
    for n, frames in frames_by_n:
        for f in frames:
            site.hear(f, which)
        time.sleep(pause)


def test_gateway_sigkilled_while_its_peers_go_on(tmp_path, broker, redis_server, subscriber):
    site = Site(tmp_path, broker, redis_server, 2)
    try:
        frames = [(n, [reading(DEV_A, n), reading(DEV_B, n)]) for n in range(1, 301)]
        t = threading.Thread(target=_stream, args=(site, frames, (0, 1)))
        t.start()
        wait_for(lambda: len(uplink_ids(subscriber)) >= 100, what="100 readings")
        site.gws[0].kill()  # SIGKILL mid-stream; gw1 hears the same bins
        t.join(60)
        want = {"%06x:0:%d" % (dev, n) for dev in (DEV_A, DEV_B) for n in range(1, 301)}
        wait_for(lambda: want - set(uplink_ids(subscriber)) <= _claimed_by_dead(site), timeout=60, what="peer publishes")
        site.gws[0].start()  # its outbox: what it had stored but not yet published
        wait_for(lambda: set(uplink_ids(subscriber)) == want, timeout=60, what="every reading published")
        wait_for(lambda: confirmed(redis_server, want), what="every claim confirmed: no takeover to come")
        site.settle(subscriber)
        gateways = collections.defaultdict(set)
        for e in readings(subscriber):
            gateways[e["message_id"]].add(e["gateway"])
        # A reading stored by the killed gateway is published by it after its restart, not by a peer
        # too — unless it died between storing and confirming its claim: then the peer took the claim
        # over (and logged it), and the one reading goes out twice under one message id.
        taken = set(re.findall(r"took over a reading .* device=(\w+) fcnt=(\d+)", site.gws[1].output()))
        twice = {mid for mid, g in gateways.items() if len(g) > 1}
        assert {tuple(mid.split(":")[0::2]) for mid in twice} <= taken, "published by two gateways: %s" % sorted(twice)[:5]
    finally:
        site.close()


def _claimed_by_dead(site):
    """Message ids the killed gw0 had stored in its outbox but not published (its disk, read-only)."""
    import sqlite3

    db = sqlite3.connect("file:%s?mode=ro" % os.path.join(site.gws[0].tmp, "state", "gateway.sqlite"), uri=True)
    try:
        return {k for (k,) in db.execute("SELECT message_key FROM outbox WHERE acked_at IS NULL AND topic LIKE '%/event'")}
    finally:
        db.close()


def test_redis_killed_and_restarted(tmp_path, broker, redis_server, subscriber):
    site = Site(tmp_path, broker, redis_server, 2)
    try:
        for n in range(1, 11):
            site.hear(reading(DEV_A, n), (0, 1))
        wait_for(lambda: len(uplink_ids(subscriber)) == 10, what="10 readings")
        before = [g.metric("binlink_frames_accepted_total") for g in site.gws]
        redis_server.kill()
        for n in range(11, 21):
            site.hear(reading(DEV_A, n), (0, 1))
        # both keep accepting and publishing on local state, and say so
        for g, b in zip(site.gws, before):
            wait_for(lambda: g.metric("binlink_frames_accepted_total") == b + 10, what="accepted without redis")
            assert g.metric("binlink_shared_state_up") == 0
            assert "shared state unavailable" in g.output()
            wait_for(lambda: [s for s in subscriber.json("gateway/%s/stats" % g.gateway_id)
                              if s.get("shared_state_up") == 0], what="stats topic says so")
            wait_for(lambda: subscriber.json("gateway/%s/shared_state" % g.gateway_id)[-1]["state"] == "local",
                     what="retained shared_state topic says so")
        wait_for(lambda: set(uplink_ids(subscriber)) >= {"0000a1:0:%d" % n for n in range(11, 21)}, what="outage readings")
        # during the outage a reading heard by two gateways may be published twice, under one id
        assert len(uplink_ids(subscriber)) <= 10 + 2 * 10
        redis_server.start()  # empty: no persistence
        for n in range(21, 31):
            site.hear(reading(DEV_A, n), (0, 1))
            time.sleep(0.05)
        for g in site.gws:
            wait_for(lambda: g.metric("binlink_shared_state_up") == 1, what="shared state back")
            wait_for(lambda: subscriber.json("gateway/%s/shared_state" % g.gateway_id)[-1]["state"] == "shared",
                     what="retained shared_state topic back to shared")
            assert "counters_reconciled" in g.output()
        wait_for(lambda: set(uplink_ids(subscriber)) >= {"0000a1:0:%d" % n for n in range(21, 31)}, what="after restart")
        r = admin(redis_server, decode_responses=True)
        assert int(r.hget("binlink:{0000a1}:ctr", "fcnt")) >= 20  # the outage's counters were pushed back
        for n in range(31, 41):  # once reconciled: each reading once again
            site.hear(reading(DEV_A, n), (0, 1))
        wait_for(lambda: set(uplink_ids(subscriber)) >= {"0000a1:0:%d" % n for n in range(31, 41)}, what="31..40")
        wait_for(lambda: confirmed(redis_server, ["0000a1:0:%d" % n for n in range(31, 41)]),
                 what="every claim confirmed: no takeover to come")
        site.settle(subscriber)
        later = [i for i in uplink_ids(subscriber) if int(i.split(":")[2]) > 30]
        assert len(later) == 10
    finally:
        site.close()


def test_topology_a_bin_is_heard_by_one_two_or_no_gateway(tmp_path):
    """The simulator's sites and per-link shadowing: coverage varies by bin, and what a gateway's
    radio receives is what its links allow (a bin heard by none reaches no pty)."""
    from binlink.sim.fleet import Fleet
    from binlink.sim.demo import URBAN, _sites

    links = [str(tmp_path / ("r%d" % i)) for i in range(3)]
    fleet = Fleet(40, seed=3, links=links, sites=_sites(3), channel=URBAN, wake_s=900, report_s=900)
    try:
        coverage = fleet.coverage()
        counts = collections.Counter(len(v) for v in coverage.values())
        assert counts[0] and counts[1] and counts[2] + counts[3], counts
        fleet.channel.fading_db = 0.0  # the typical day exactly: only the links' own losses
        fleet.channel.loss = fleet.channel.bit_errors = fleet.channel.duplicates = 0.0
        fleet.run(2 * 3600)
        assert fleet.channel.stats["lost_range"] >= counts[0]  # the unheard bins' frames reached no one
        delivered = fleet.channel.stats["delivered"]
        heard = sum(1 for d in fleet.devices if coverage[d.bin_id])
        assert 0 < delivered < fleet.frames_sent and heard < len(fleet.devices)
    finally:
        fleet.close()


def test_demo_with_three_gateways(tmp_path):
    r = subprocess.run([BINLINK, "demo", "--gateways", "3", "--bins", "12", "--seconds", "6", "--speed", "1800"],
                       capture_output=True, text=True, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-2000:]
    assert "3 gateways sharing counters" in out and "bins heard by" in out
    assert "bins=12" in out
    if shutil.which("redis-server"):
        assert "running ONE gateway" not in out


def hello(dev, fcnt, key=None):
    return codec.encode_hello(key or KEYS[dev], dev, fcnt, (1, 1, 0), 4, b"\x12\x34\x56\x78")


def test_gateway_added_later_resynchronises_old_bins_alone(tmp_path, broker, subscriber):
    """No Redis: a new gateway meets bins whose counters are past 65 536. bin-a: its first report
    is held, the second reveals the counter (two tags must verify), both are published. bin-b: one
    report held, then the hello names the full counter; the held report is published too."""
    site = Site(tmp_path, broker, None, 1)
    gw = site.gws[0]
    try:
        base = 70000
        site.hear(reading(DEV_A, base), [0])
        wait_for(lambda: gw.metric("binlink_frames_rejected_total", reason="bad_tag") == 1, what="first report held")
        assert uplink_ids(subscriber) == []
        site.hear(reading(DEV_A, base + 1), [0])
        wait_for(lambda: sorted(uplink_ids(subscriber)) == ["0000a1:0:70000", "0000a1:0:70001"], what="resync after 1 report")
        site.hear(reading(DEV_A, base + 2), [0])
        wait_for(lambda: "0000a1:0:70002" in uplink_ids(subscriber), what="then as usual")
        site.hear(reading(DEV_B, 0x30000), [0])
        wait_for(lambda: gw.metric("binlink_frames_rejected_total", reason="bad_tag") == 2, what="bin-b report held")
        site.hear(hello(DEV_B, 0x30001), [0])
        wait_for(lambda: "0000b2:0:%d" % 0x30000 in uplink_ids(subscriber), what="held report published after the hello")
        assert gw.metric("binlink_frames_recovered_total") == 3
        assert gw.metric("binlink_counter_resyncs_total") == 2
        site.hear(reading(DEV_A, base + 1), [0])  # a recovered frame again: the same bytes, not published again
        wait_for(lambda: gw.metric("binlink_duplicates_total") == 1, what="copy recognised")
        site.hear(reading(DEV_A, base - 5), [0])  # older than the resynchronised counter: never published
        wait_for(lambda: gw.metric("binlink_frames_rejected_total", reason="replay") == 1, what="the old frame refused")
        site.settle(subscriber)
        assert len(uplink_ids(subscriber)) == 4
    finally:
        site.close()


def test_gateway_added_later_knows_old_bins_from_the_shared_state(tmp_path, broker, redis_server, subscriber):
    site = Site(tmp_path, broker, redis_server, 1)
    try:
        site.hear(hello(DEV_A, 0x20000), [0])
        site.hear(reading(DEV_A, 0x20001), [0])
        wait_for(lambda: len(uplink_ids(subscriber)) == 1, what="first reading")
        gw, _ = site.add()  # year two: a new gateway, empty state, bin-a past 65 536
        site.hear(reading(DEV_A, 0x20002), [1])  # its very first report is accepted
        wait_for(lambda: "0000a1:0:%d" % 0x20002 in uplink_ids(subscriber), what="new gateway publishes at once")
        assert gw.metric("binlink_frames_rejected_total") == 0
    finally:
        site.close()


def test_rekey_under_load_is_known_to_every_gateway_and_loses_nothing(tmp_path, broker, redis_server, subscriber):
    site = Site(tmp_path, broker, redis_server, 2)
    try:
        stop = threading.Event()

        def bin_b():  # bin-b keeps reporting through both gateways meanwhile
            n = 1
            while not stop.is_set():
                site.hear(reading(DEV_B, n), (0, 1))
                n += 1
                time.sleep(0.02)
            return n

        t = threading.Thread(target=bin_b)
        t.start()
        for n in range(40, 44):
            site.hear(reading(DEV_A, n), (0, 1))
        wait_for(lambda: "0000a1:0:43" in uplink_ids(subscriber), what="old key readings")
        key_out = str(tmp_path / "bin-a.key")
        r = subprocess.run([BINLINK, "registry", "--config", site.gws[0].config, "rekey", "bin-a", "--key-out", key_out],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        new_key = key_from_key_file(key_out)
        assert new_key.hex() not in r.stdout + r.stderr
        assert "epoch 1" in r.stdout
        # gw1's registry file was never touched: it learns the new key from the shared registry
        wait_for(lambda: site.gws[1].output().count("registry reloaded") >= 1 and "new key for device" in site.gws[1].output(),
                 what="gw1 learns the new key")
        wait_for(lambda: "new key for device" in site.gws[0].output(), what="gw0 learns the new key")
        site.hear(hello(DEV_A, 0, new_key), (1,))
        wait_for(lambda: [e for e in subscriber.events("hello") if e["message_id"] == "0000a1:1:0"], what="the hello")
        for n in range(1, 7):  # counters 1..6 again, under the new key: published, not swallowed
            site.hear(reading(DEV_A, n, key=new_key), (0, 1) if n % 2 else (1,))
            # a bin's frames are minutes apart: each is published before the next comes
            wait_for(lambda: "0000a1:1:%d" % n in uplink_ids(subscriber), what="new key reading %d" % n)
        want = {"0000a1:1:%d" % n for n in range(1, 7)}
        wait_for(lambda: want <= set(uplink_ids(subscriber)), what="new key readings published")
        stop.set()
        t.join()
        wait_for(lambda: confirmed(redis_server, uplink_ids(subscriber)), what="every claim confirmed: no takeover to come")
        site.settle(subscriber)
        ids = uplink_ids(subscriber)
        assert len(ids) == len(set(ids)), "a reading published twice"
        b = sorted(int(i.split(":")[2]) for i in ids if i.startswith("0000b2"))
        assert b == list(range(1, len(b) + 1)), "bin-b lost readings while bin-a was re-keyed"
        state = [s for s in subscriber.json("bin/bin-a/state")][-1]
        assert state["fcnt"] == 6 and state["device"] == "0000a1"  # the retained state follows the new key
    finally:
        site.close()


def test_retire_clears_retained_state_and_discovery(tmp_path, broker, subscriber):
    from tests.harness import Subscriber

    site = Site(tmp_path, broker, None, 1)
    try:
        site.hear(reading(DEV_C, 1), [0])
        wait_for(lambda: subscriber.on("bin/bin-c/state") and any("bin_c" in t for t, _ in subscriber.on("/config")),
                 what="state and discovery of bin-c")
        r = subprocess.run([BINLINK, "registry", "--config", site.gws[0].config, "retire", "bin-c"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "never reused" in r.stdout
        topics = {t for t, _ in subscriber.on("/config") if "bin_c" in t} | {t for t, _ in subscriber.on("bin/bin-c/state")}
        assert len(topics) >= 2

        def last_payloads():
            last = {}
            for t, p in subscriber.on(""):
                last[t] = p
            return {t: last[t] for t in topics}

        wait_for(lambda: set(last_payloads().values()) == {b""}, what="empty retained payloads on every topic")
        late = Subscriber(broker.port)
        try:
            # the broker queues a subscription's retained messages as it handles the SUBSCRIBE; a
            # marker published afterwards on the same connection comes after every one of them
            late.c.publish("binlink/testcity/test-marker", b"after the retained messages", qos=1)
            wait_for(lambda: late.on("/test-marker"), what="the late subscriber's marker")
            assert not [t for t, _ in late.on("") if t in topics]  # nothing retained for bin-c any more
            assert late.on("gateway/gw0/status")  # what is still retained did come
        finally:
            late.close()
        r = subprocess.run([BINLINK, "registry", "--config", site.gws[0].config, "list"], capture_output=True, text=True)
        assert "c3" in r.stdout and "retired" in r.stdout
    finally:
        site.close()


def test_shared_registry_newer_key_and_retirement_win(redis_server, tmp_path):
    """Two gateways' registry files, merged through Redis: a newer key epoch wins, a retirement
    wins for good, a bin added at one gateway appears at the other; Redis down: the file alone."""
    from binlink.gateway import registry
    from binlink.gateway.metrics import Metrics
    from binlink.gateway.shared_state import SharedState

    a, b = str(tmp_path / "a.toml"), str(tmp_path / "b.toml")
    for path in (a, b):
        for dev, bin_id, key, depth, full in DEVICES:
            registry.add(path, dev, bin_id, key, depth, full)
    registry.rekey(a, "bin-a")
    registry.retire(a, "bin-c")
    new = registry.provision(a, "bin-d", 900, 100)
    shared = SharedState(shared_settings(redis_server), Metrics(), "gw-a")
    merged_a = shared.merge(registry.load(a))
    merged_b = SharedState(shared_settings(redis_server), Metrics(), "gw-b").merge(registry.load(b))
    assert merged_b[DEV_A].key_epoch == 1 and merged_b[DEV_A].key == merged_a[DEV_A].key != KEY
    assert DEV_C not in merged_b and DEV_C in merged_b.retired
    assert merged_b[new.device_id].bin_id == "bin-d"
    assert not shared.claim_id(new.device_id) and not shared.claim_id(DEV_C)  # ids the fleet holds
    redis_server.kill()
    alone = SharedState(shared_settings(redis_server, timeout_s=0.2), Metrics(), "gw-b")
    assert not alone.up and alone.merge(registry.load(b))[DEV_A].key == KEY


def test_acl_user_as_documented_and_no_secret_in_logs(tmp_path, broker, subscriber):
    """Redis with the default user off and an ACL user limited to binlink's keys and commands (the
    lines docs/gateway.md gives); two gateways log in with a password file; nothing secret is logged."""
    server = RedisServer(tmp_path).start()
    site = Site(tmp_path, broker, None, 0)
    try:
        conf = server.config()
        secret = open(os.path.join(server.tmp, "registry.secret")).read().strip()
        for i in range(2):
            site.add(extra=conf)
        for n in range(1, 6):
            site.hear(reading(DEV_A, n), (0, 1))
        wait_for(lambda: len(uplink_ids(subscriber)) == 5 and site.total("binlink_duplicates_total") == 5,
                 what="5 readings, 5 duplicates")
        site.settle(subscriber)
        assert len(uplink_ids(subscriber)) == 5
        for g in site.gws:
            assert g.metric("binlink_shared_state_up") == 1
            out = g.output()
            assert PASSWORD not in out and secret not in out and KEY.hex() not in out and KEY2.hex() not in out
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).ping()  # the default user is off
    finally:
        site.close()
        server.stop()


def test_bin_added_at_one_gateway_is_known_to_the_others_without_restart(tmp_path, broker, redis_server, subscriber):
    site = Site(tmp_path, broker, redis_server, 2)
    try:
        key_out = str(tmp_path / "new.key")
        r = subprocess.run([BINLINK, "registry", "--config", site.gws[0].config, "add", "bin-new", "--depth-mm", "1000",
                            "--full-mm", "100", "--key-out", key_out], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        dev = int(r.stdout.split("is device ")[1].split(",")[0], 16)
        key = key_from_key_file(key_out)
        ids = admin(redis_server, decode_responses=True).smembers("binlink:ids")
        assert "%06x" % dev in ids  # claimed for the whole fleet: no other registry can draw it
        wait_for(lambda: "devices=%d added=1" % (len(DEVICES) + 2) in site.gws[1].output(),  # + the marker bin
                 what="gw1 polls the shared registry")
        site.hear(codec.encode_reading(key, dev, 1, 500, 20, 3700, 0, 5, 5), [1])  # heard by gw1 only
        wait_for(lambda: [e for e in subscriber.events() if e["bin_id"] == "bin-new"], what="gw1 publishes the new bin")
    finally:
        site.close()


def test_tls_to_redis(tmp_path, broker, subscriber, pki):
    """rediss:// with the site's CA, as docs/gateway.md sets it up: two gateways, one reading once."""
    server = RedisServer(tmp_path, tls_dir=str(pki)).start()
    site = Site(tmp_path, broker, None, 0)
    try:
        conf = server.config(ca_file=pki / "ca.crt")
        for _ in range(2):
            site.add(extra=conf)
        site.hear(reading(DEV_A, 1), (0, 1))
        wait_for(lambda: len(uplink_ids(subscriber)) == 1 and site.total("binlink_duplicates_total") == 1,
                 what="one reading, one duplicate, over TLS")
        assert all(g.metric("binlink_shared_state_up") == 1 for g in site.gws)
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=server.port, socket_timeout=2).ping()  # no plain-text port
    finally:
        site.close()
        server.stop()
