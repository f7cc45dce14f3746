"""MQTT client choice, measured: the same QoS 1 messages to the same Mosquitto, the gateway's
in-flight window, one thread driving each client, until every PUBACK is in. Side by side in one run.
Each client waits (select or a short sleep) while its window is full, as the gateway does.
And how long the publisher's client takes to notice a broker gone silent after CONNACK."""
import select
import socket
import threading
import time

import paho.mqtt.client as mqtt

from binlink.gateway import mqtt_wire
from binlink.gateway.config import Mqtt
from binlink.sim.broker import Mosquitto

WINDOW = Mqtt.max_inflight
PAHO_WINDOW = 1000  # paho's best here: it rescans its window per PUBACK, so 4000 is several times slower
PAYLOAD = b'{"battery_v":3.7,"bin_id":"bin-17","device":"000011","distance_mm":820,' + b'"x":0,' * 40 + b'"z":1}'


def _topics(n):
    return ["binlink/bench/bin/bin-%d/event" % (i % 200) for i in range(n)]


def paho_tuned(port, n):
    """paho 2.2 as fast as we could drive it: our own loop_read/loop_write, no loop thread."""
    acked = [0]
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-paho")
    c.max_inflight_messages_set(PAHO_WINDOW)
    c.max_queued_messages_set(0)
    c.on_publish = lambda *a: acked.__setitem__(0, acked[0] + 1)
    c.connect("127.0.0.1", port)
    while not c.is_connected():
        c.loop(0.01)
    topics = _topics(n)
    t0, c0 = time.perf_counter(), time.process_time()
    sent = 0
    sock = c.socket()
    while acked[0] < n:
        while sent < n and sent - acked[0] < PAHO_WINDOW:
            c.publish(topics[sent], PAYLOAD, qos=1)
            sent += 1
        if c.want_write():
            c.loop_write()
        r, _, _ = select.select([sock], [], [], 1.0)
        if r:
            c.loop_read(1000)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    c.disconnect()
    return n / wall, cpu * 1000 / n


def gmqtt_client(port, n):
    """gmqtt 0.8 (asyncio, MQTT 3.1.1 here). It has no public per-message acknowledgement hook: the
    window is kept by the size of its store of unacknowledged messages."""
    import asyncio

    import gmqtt
    from gmqtt.mqtt.constants import MQTTv311

    async def go():
        c = gmqtt.Client("bench-gmqtt")
        await c.connect("127.0.0.1", port, version=MQTTv311)
        unacked = c._persistent_storage
        topics = _topics(n)
        t0, c0 = time.perf_counter(), time.process_time()
        sent = 0
        while sent < n or not unacked.is_empty:
            room = WINDOW - len(unacked.get_all())
            if sent < n and room >= WINDOW // 4:
                for i in range(sent, min(n, sent + room)):
                    c.publish(topics[i], PAYLOAD, qos=1)
                sent = min(n, sent + room)
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(0.0005)  # no acknowledgement hook to wait on
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        await c.disconnect()
        return n / wall, cpu * 1000 / n

    return asyncio.run(go())


def batched(port, n):
    s = mqtt_wire.Session("127.0.0.1", port, "bench-batched")
    topics = [t.encode() for t in _topics(n)]
    t0, c0 = time.perf_counter(), time.process_time()
    sent = acked = 0
    while acked < n:
        room = WINDOW - (sent - acked)
        if room >= WINDOW // 4 or sent == acked:
            for i in range(sent, min(n, sent + room)):
                s.publish(topics[i], PAYLOAD)
            sent = min(n, sent + room)
            s.flush()
        select.select([s], [], [], 1.0)
        acked += len(s.read()[0])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    s.disconnect()
    return n / wall, cpu * 1000 / n


def silent_broker_detect(keepalive=10):
    """Seconds from CONNACK to BrokerSilent, against a listener that answers CONNECT and then
    nothing (a SIGSTOPped broker, a black-holed path): the goal is 1.5 keepalives at most."""
    listener = socket.create_server(("127.0.0.1", 0))
    held = []

    def answer_once():
        sock, _ = listener.accept()
        sock.recv(65536)  # CONNECT
        sock.sendall(b"\x20\x02\x00\x00")
        held.append(sock)  # open, never read again

    t = threading.Thread(target=answer_once, daemon=True)
    t.start()
    s = mqtt_wire.Session("127.0.0.1", listener.getsockname()[1], "bench-silent", keepalive=keepalive)
    connected = time.monotonic()
    try:
        while True:
            select.select([s], [], [], max(0.0, s.next_due() - time.monotonic()))
            s.tick(time.monotonic())
    except mqtt_wire.BrokerSilent:
        return time.monotonic() - connected
    finally:
        s.close()
        t.join()
        for sock in held:
            sock.close()
        listener.close()


def run(n=50000):
    broker = Mosquitto().start()
    try:
        out = {}
        for name, fn in (("paho_tuned", paho_tuned), ("gmqtt", gmqtt_client), ("batched", batched)):
            rate, cpu = max((fn(broker.port, n) for _ in range(2)), key=lambda r: r[0])
            out["mqtt_%s_msgs_per_s" % name] = round(rate)
            out["mqtt_%s_cpu_s_per_1k_msgs" % name] = round(cpu, 4)
        out["mqtt_batched_vs_paho"] = round(out["mqtt_batched_msgs_per_s"] / out["mqtt_paho_tuned_msgs_per_s"], 2)
        out["mqtt_silent_broker_detect_s"] = round(silent_broker_detect(), 2)
        return out
    finally:
        broker.stop()


if __name__ == "__main__":
    print(run())
