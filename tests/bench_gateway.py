"""Gateway benchmark: real pty → gateway process → real Mosquitto, QoS 1, durable outbox on."""
import os
import tempfile
import threading
import time

from binlink.wire import codec, framing
from binlink.sim.broker import Mosquitto
from binlink.sim.serial_link import PtyLink
from tests.harness import GatewayProcess, Subscriber, wait_for

DEVICES = 200
BAUD = 115200


def _keys():
    return {d: bytes([d % 256]) * 16 for d in range(1, DEVICES + 1)}  # TEST KEYS


def _distance(fcnt):
    """A bin filling by ~1 % a report and emptied every 80 reports: events at a realistic rate."""
    return 1150 - (fcnt % 80) * 10


def _frames(n, start_fcnt=1):
    keys = _keys()
    out = []
    for i in range(n):
        dev = 1 + i % DEVICES
        fcnt = start_fcnt + i // DEVICES
        out.append((dev, fcnt, framing.frame(codec.encode_reading(keys[dev], dev, fcnt, _distance(fcnt), 20, 3700, 0, 5, 5))))
    return out


def _rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def run(n_burst=20000, steady_fps=500, steady_s=10):
    tmp = tempfile.mkdtemp(prefix="binlink-bench-")
    broker = Mosquitto().start()
    link = PtyLink(os.path.join(tmp, "radio0"))
    devices = [(d, "bin-%d" % d, k, 1200, 200) for d, k in _keys().items()]
    gw = GatewayProcess(tmp, broker.port, [("radio0", link.link, "raw")], devices=devices).start()
    sub = Subscriber(broker.port, topics=("binlink/+/bin/+/event",))
    try:
        # 1. burst: as fast as the pty takes it; done when the broker acknowledged every message
        frames = _frames(n_burst)
        blob = b"".join(f for _, _, f in frames)
        t0 = time.perf_counter()
        writer = threading.Thread(target=link.write, args=(blob,))
        writer.start()
        # done: every frame accepted and every message acknowledged by the broker
        wait_for(lambda: gw.metric("binlink_frames_accepted_total") >= n_burst and gw.metric("binlink_outbox_depth") == 0,
                 timeout=600, interval=0.1, what="burst published")
        elapsed = time.perf_counter() - t0
        writer.join()
        frame_len = len(frames[0][2])
        line_rate = BAUD / 10.0 / frame_len  # 8N1: 10 bits per byte
        gateway_fps = n_burst / elapsed
        # 2. steady 500 frames/s: latency from the byte written to the event at a subscriber
        steady = _frames(steady_fps * steady_s, start_fcnt=n_burst // DEVICES + 1)
        sent_at = {}
        t_start = time.perf_counter()
        for i, (dev, fcnt, f) in enumerate(steady):
            due = t_start + i / steady_fps
            while time.perf_counter() < due:
                time.sleep(max(0.0, min(0.002, due - time.perf_counter())))
            sent_at["%06x:0:%d" % (dev, fcnt)] = time.perf_counter()
            link.write(f)
        wait_for(lambda: len(sub.on("/event")) >= n_burst + len(steady), timeout=120, what="steady events")
        arrivals = sub.arrivals
        lat = sorted((arrivals[k] - sent_at[k]) * 1000 for k in sent_at if k in arrivals)
        p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99) - 1]
        rss = _rss_mb(gw.proc.pid)
        return {
            "gateway_frames_per_s": round(gateway_fps),
            "serial_line_rate_frames_per_s": round(line_rate, 1),
            "gateway_vs_line_rate": round(gateway_fps / line_rate, 1),
            "gateway_p50_latency_ms": round(p50, 1),
            "gateway_p99_latency_ms": round(p99, 1),
            "gateway_rss_mb": round(rss, 1),
        }
    finally:
        gw.kill()
        sub.close()
        link.close()
        broker.stop()
