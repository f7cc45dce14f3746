"""Several gateways benchmark: three gateway processes sharing state through a real redis-server,
each reading its own pty, publishing to one real Mosquitto; one gateway alone in the same run."""
import collections
import json
import tempfile
import time

from binlink.wire import codec, framing
from binlink.sim.broker import Mosquitto
from binlink.sim.serial_link import PtyLink
from tests.harness import GatewayProcess, RedisServer, Subscriber, wait_for

BINS = 60
READINGS = 40  # per bin
RESYNC_FROM = 70000  # a bin's counter when a new gateway first hears it: past 65 536


def _key(dev):
    return bytes([dev % 256]) * 16  # TEST KEYS


def _devices():
    return [(dev, "bin-%03d" % dev, _key(dev), 1200, 200) for dev in range(1, BINS + 1)]


def _coverage(dev, n):
    """Overlapping coverage: every bin heard by two of the gateways, every fifth by all."""
    if n == 1:
        return (0,)
    return tuple(range(n)) if dev % 5 == 0 else (dev % n, (dev + 1) % n)


def _uplinks(sub):
    return [m["message_id"] for m in sub.events()]


def _run_site(tmp, broker, n, redis_server=None, ttl_s=3600):
    """Starts n gateways; writes READINGS frames of each bin to the gateways that hear it; returns
    (frames per second end to end, duplicates published, gateways, links, frames by id)."""
    sub = Subscriber(broker.port, topics=("binlink/+/bin/+/event",))
    links, gws = [], []
    extra = redis_server.config(ttl_s) if redis_server else ""
    for i in range(n):
        links.append(PtyLink("%s/radio-%d-%d" % (tmp, n, i)))
        gws.append(GatewayProcess("%s/site%d/gw%d" % (tmp, n, i), broker.port, [("radio0", links[i].link, "raw")],
                                  devices=_devices(), gateway_id="gw%d" % i, extra=extra).start())
    frames = {}
    t0 = time.perf_counter()
    for fcnt in range(1, READINGS + 1):
        for dev in range(1, BINS + 1):
            f = codec.encode_reading(_key(dev), dev, fcnt, 1150 - (fcnt % 30) * 30, 20, 3700, 0, 5, 5)
            frames["%06x:0:%d" % (dev, fcnt)] = f
            for i in _coverage(dev, n):
                links[i].write(framing.frame(f))
    want = BINS * READINGS
    try:
        wait_for(lambda: len(set(_uplinks(sub))) >= want, timeout=300, interval=0.01, what="every reading published")
    except AssertionError:
        _close(gws, links)  # no gateway left running after a failed bench
        sub.close()
        raise
    elapsed = time.perf_counter() - t0
    time.sleep(2.0)  # a second copy would arrive by now
    ids = collections.Counter(_uplinks(sub))
    sub.close()
    return want / elapsed, sum(c - 1 for c in ids.values()), gws, links, frames


def _close(gws, links):
    for g in gws:
        if g.alive():
            g.kill()
    for link in links:
        link.close()


def _replays(broker, gws, links, frames):
    """Frames recorded on air, replayed at the other gateways after the shared dedup TTL (a gateway
    that heard a frame itself still knows its bytes: a duplicate; one that never did: a replay).
    Returns frames accepted plus readings published because of them: must be 0."""
    sub = Subscriber(broker.port, topics=("binlink/+/bin/+/event",))
    before = sum(g.metric("binlink_frames_accepted_total") for g in gws)
    read = sum(g.metric("binlink_frames_read_total") for g in gws)
    time.sleep(1.5)  # past the 1 s dedup TTL: these are replays now, not late copies
    for f in frames:
        for link in links[1:]:
            link.write(framing.frame(f))
    want = len(frames) * (len(links) - 1)
    wait_for(lambda: sum(g.metric("binlink_frames_read_total") for g in gws) - read >= want, timeout=120,
             what="every replay read")
    time.sleep(1.0)
    accepted = sum(g.metric("binlink_frames_accepted_total") for g in gws) - before
    published = len(_uplinks(sub))
    sub.close()
    return int(accepted + published)


def _resync(tmp, broker):
    """A gateway that never heard a bin whose counter is past 65 536, no shared state: the bin's
    reports (consecutive counters, as the firmware sends them) until the gateway publishes one."""
    sub = Subscriber(broker.port, topics=("binlink/+/bin/+/event",))
    link = PtyLink("%s/radio-resync" % tmp)
    gw = GatewayProcess("%s/resync" % tmp, broker.port, [("radio0", link.link, "raw")], devices=_devices()[:1]).start()
    try:
        sent = 0
        for fcnt in range(RESYNC_FROM, RESYNC_FROM + 30):
            link.write(framing.frame(codec.encode_reading(_key(1), 1, fcnt, 900, 20, 3700, 0, 5, 5)))
            sent += 1
            try:
                wait_for(lambda: _uplinks(sub), timeout=3, what="a reading of the bin")
                break
            except AssertionError:
                continue
        time.sleep(0.5)
        lost = sent - len(set(_uplinks(sub)))
        return sent, lost
    finally:
        gw.kill()
        link.close()
        sub.close()


def run():
    tmp = tempfile.mkdtemp(prefix="binlink-bench-multi-")
    alone = Mosquitto().start()
    try:
        one_fps, _, gws, links, _ = _run_site(tmp, alone, 1)
        _close(gws, links)
    finally:
        alone.stop()
    # a broker of its own: new gateways raise their counters from the retained states they find
    # (docs/gateway.md, state recovery), and the first run's would make every frame a replay
    broker = Mosquitto().start()
    redis_server = RedisServer(tmp).start()
    try:
        fps, dups, gws, links, frames = _run_site(tmp, broker, 3, redis_server, ttl_s=1)
        try:
            recorded = [f for k, f in frames.items() if int(k.split(":")[2]) <= 5]
            replays = _replays(broker, gws, links, recorded)
        finally:
            _close(gws, links)
        resync_sent, resync_lost = _resync(tmp, broker)
    finally:
        redis_server.stop()
        broker.stop()
    return {
        "multi_gateway_duplicates_published": dups,
        "cross_gateway_replays_accepted": replays,
        "multi_gateway_frames_per_s": round(fps),
        "multi_gateway_one_gateway_frames_per_s": round(one_fps),
        "resync_reports_needed": resync_sent,
        "resync_readings_lost": resync_lost,
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
