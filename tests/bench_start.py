"""A gateway's start with 10,000 bins in the registry (issue 22): time to ready, peak memory of
all its processes, retained discovery messages published by a restart when nothing changed (and
when three bins were renamed). Three starts: a fresh install, a restart, a restart after the edit;
the broker holds a retained state per bin, as at a running site (every start reads them back).

Real parts: a registry of 10,000 bins, the `binlink gateway` process and its publisher process,
a real Mosquitto, a pty radio. "Ready" is from the spawn to a reading written on the radio as
soon as the port is open being on the broker: the gateway has loaded its registry and state,
reached the broker and publishes. Peak memory is the sum of each process's VmHWM (a bound on the
peak of the sum), read just before the gateway stops. Discovery messages are counted by a
subscriber to the discovery prefix that was there before the start: what the broker forwards
live (retained flag off), the gateway's status and its availability left out."""
import json
import os
import tempfile
import time

from binlink.gateway import registry
from binlink.sim.broker import Mosquitto
from binlink.sim.serial_link import PtyLink
from binlink.wire import codec, framing
from tests.bench_gateway import _cpu_s, _tree
from tests.harness import GatewayProcess, wait_for

BINS = 10_000


def _key(dev):
    return dev.to_bytes(3, "big") * 5 + b"\x01"  # TEST KEYS


def write_registry(path, n, renamed=()):
    """A registry of n bins written at once (registry.add rewrites the file per bin)."""
    devices = [registry.Device(dev, "bin-%05d" % dev, _key(dev), 1200, 200, name="Bin %d%s" % (dev, " (moved)" * (dev in renamed)),
                               lat=52.0 + dev * 1e-5, lon=4.0 + dev * 1e-5) for dev in range(1, n + 1)]
    registry.write(path, registry.to_data(registry.Registry({d.device_id: d for d in devices})))


def retain_states(port, n):
    """The broker as a running site leaves it: a retained state per bin (rendered by the gateway's
    own code), which every start reads back (recovery: clock evidence, counters)."""
    import paho.mqtt.client as mqtt

    from binlink.gateway import integrate
    from binlink.gateway.uplink import Reading

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-start-states")
    c.connect("127.0.0.1", port)
    c.loop_start()
    now = time.time() - 3600
    info = None
    for dev in range(1, n + 1):
        d = registry.Device(dev, "bin-%05d" % dev, _key(dev), 1200, 200, name="Bin %d" % dev)
        reading = Reading(fcnt=0, age_s=0, distance_mm=800, temperature_c=20, battery_mv=3600, flags=0, valid_pings=5,
                          pings=5, fill_pct=40.0)
        core = integrate.reading_core(d, reading, -90, 7.5, now, True, False)
        payload = integrate.render(integrate.record("state", core, integrate.forecast_part(d, 2.0, None),
                                                    integrate.record_tail(d, "radio0", "gw-old")))
        info = c.publish("binlink/testcity/bin/%s/state" % d.bin_id, payload, qos=1, retain=True)
    info.wait_for_publish(60)
    c.loop_stop()
    c.disconnect()


def _hwm_mb(pids):
    total = 0.0
    for p in pids:
        try:
            with open("/proc/%d/status" % p) as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024.0
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


class LiveCounter:
    """Counts what the broker forwards live on the discovery prefix (MQTT 5, retain handling 2: the
    configs retained there before are not sent), and sees the bench bin's state."""

    def __init__(self, port):
        import threading

        import paho.mqtt.client as mqtt
        from paho.mqtt.subscribeoptions import SubscribeOptions

        self.live, self.states, self.ready = 0, [], threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-start-%d" % os.getpid(), protocol=mqtt.MQTTv5)
        opts = SubscribeOptions(qos=1, retainHandling=2)
        self.c.on_connect = lambda c, *a: c.subscribe([("homeassistant/#", opts), ("binlink/+/bin/bin-00001/state", opts)])
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.ready.wait(10)

    def _on_message(self, client, userdata, msg):
        if msg.topic.startswith("homeassistant/") and not msg.topic.startswith("homeassistant/status"):
            self.live += 1
        elif msg.topic.endswith("/state"):
            self.states.append(json.loads(msg.payload).get("fcnt"))

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def _settled(sub):
    n = sub.live
    time.sleep(0.5)  # a count that stopped moving (the broker forwards in order, the gateway is done)
    return n


def _start(tmp, port, link, fcnt, bins):
    """One start: (seconds to the reading on the broker, peak MB of the processes, discovery
    messages forwarded live)."""
    sub = LiveCounter(port)
    gw = GatewayProcess(tmp, port, [("radio0", link.link, "raw")])
    frame = framing.frame(codec.encode_reading(_key(1), 1, fcnt, 800, 20, 3600, 0, 5, 5))
    t0 = time.perf_counter()
    gw.start(wait_sources=False)
    try:
        listening = time.perf_counter() - t0
        wait_for(lambda: gw.metric("binlink_serial_connected") >= 1, timeout=60, interval=0.01, what="serial port open")
        opened = time.perf_counter() - t0
        link.write(frame)
        wait_for(lambda: fcnt in sub.states, timeout=120, interval=0.01, what="the reading on the broker")
        ready = time.perf_counter() - t0
        cpu = _cpu_s(_tree(gw.proc.pid))
        if os.environ.get("BENCH_VERBOSE"):
            print("    metrics listening %.2f s, serial open (state checked) %.2f s, reading on the broker %.2f s, "
                  "CPU of both processes %.2f s" % (listening, opened, ready, cpu))
        # discovery done: the gateway logs it once the broker acknowledged every config of the round
        wait_for(lambda: "discovery published" in gw.output() or "discovery unchanged" in gw.output(), timeout=300,
                 interval=0.1, what="discovery done")
        wait_for(lambda: gw.metric("binlink_outbox_depth") == 0, timeout=60, what="outbox drained")
        pids = _tree(gw.proc.pid)
        peak = _hwm_mb(pids)
        if os.environ.get("BENCH_VERBOSE"):
            print("    VmHWM MB by process:", [round(_hwm_mb([p]), 1) for p in pids])
        # what the gateway published has reached this subscriber: a message of its own after it
        sub.c.publish("homeassistant/status/bench", "end", qos=1).wait_for_publish(10)
        wait_for(lambda: sub.live == _settled(sub), timeout=60, interval=0.2, what="discovery forwarded")
        return ready, peak, sub.live, cpu
    finally:
        gw.terminate()
        sub.close()


def run(bins=BINS):
    tmp = tempfile.mkdtemp(prefix="binlink-bench-start-")
    broker = Mosquitto().start()
    link = PtyLink(os.path.join(tmp, "radio0"))
    try:
        write_registry(os.path.join(tmp, "devices.toml"), bins)
        retain_states(broker.port, bins)
        first_s, first_mb, first_msgs, first_cpu = _start(tmp, broker.port, link, 1, bins)
        again_s, again_mb, again_msgs, again_cpu = _start(tmp, broker.port, link, 2, bins)
        write_registry(os.path.join(tmp, "devices.toml"), bins, renamed=(7, 8, 9))  # three bins renamed
        changed_s, changed_mb, changed_msgs, changed_cpu = _start(tmp, broker.port, link, 3, bins)
        return {
            "start_10k_bins_s": round(max(first_s, again_s, changed_s), 2),
            "start_10k_bins_restart_s": round(again_s, 2),
            # CPU to ready, both processes: what a shared host's load does not inflate as it does the wall time
            "start_10k_bins_cpu_s": round(max(first_cpu, again_cpu, changed_cpu), 2),
            "start_10k_bins_rss_mb": round(max(first_mb, again_mb, changed_mb), 1),
            "discovery_msgs_start_3_bins_renamed_10k_bins": changed_msgs,
            "discovery_msgs_first_start_10k_bins": first_msgs,
            "discovery_msgs_per_start_10k_bins": again_msgs,
        }
    finally:
        link.close()
        broker.stop()


if __name__ == "__main__":
    import sys

    print(run(int(sys.argv[1]) if len(sys.argv) > 1 else BINS))
