"""`binlink demo`: an embedded broker, a simulated fleet and the real gateway, with a live view.

Everything is real except the bins and the radio: the gateway is its own process reading a
pseudo-terminal through pyserial and publishing to a real broker, which the view subscribes to."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

LAST_LINE = "bins={bins} sent={sent} published={published} lost_on_air={lost_on_air} lost_after_gateway={lost_after_gateway}"


def add_parser(sub):
    p = sub.add_parser("demo", help="simulated fleet -> gateway -> MQTT broker, with a live terminal view")
    p.add_argument("--bins", type=int, default=12)
    p.add_argument("--seconds", type=float, default=60.0, help="how long to run (0: until Ctrl-C)")
    p.add_argument("--speed", type=float, default=900.0, help="simulated seconds per wall second")
    p.add_argument("--format", default="raw+rssi", choices=["raw", "raw+rssi", "rylr998"])
    p.add_argument("--broker", help="HOST:PORT of an existing broker (default: start an embedded one)")
    p.add_argument("--embedded", default="auto", choices=["auto", "mosquitto", "amqtt"],
                   help="embedded broker: Mosquitto where installed, else amqtt (auto)")
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=cmd_demo)


class View:
    """What the broker says, collected by a subscriber: bin states and recent events."""

    def __init__(self, host, port, base):
        import paho.mqtt.client as mqtt

        self.states = {}
        self.events = []
        self.uplinks = set()
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="binlink-demo-view-%d" % os.getpid())
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe([(base + "/bin/+/state", 1), (base + "/bin/+/event", 1)])
        self.c.on_message = self._on_message
        self.c.reconnect_delay_set(1, 2)
        self.c.connect(host, port)
        self.c.loop_start()

    def _on_message(self, client, userdata, msg):
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        with self.lock:
            if msg.topic.endswith("/state"):
                self.states[data["bin_id"]] = (data, time.monotonic())
            elif data.get("event") == "uplink":
                self.uplinks.add(data["message_id"])
            else:
                self.events.append(data)
                del self.events[:-8]

    def render(self, fleet):
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table

        t = Table(title="binlink demo — %d bins, simulated %s" % (
            len(fleet.devices), time.strftime("%a %H:%M", time.localtime(fleet.now))), expand=True)
        for col in ("bin", "fill", "%", "°C", "battery", "RSSI", "seen"):
            t.add_column(col, justify="right" if col not in ("bin", "fill") else "left")
        now = time.monotonic()
        with self.lock:
            for bin_id in sorted(self.states):
                s, seen = self.states[bin_id]
                fill = s.get("fill_pct")
                bar = "?" * 20 if fill is None else "█" * int(fill / 5) + "·" * (20 - int(fill / 5))
                colour = "red" if (fill or 0) >= 90 else "yellow" if (fill or 0) >= 75 else "green"
                t.add_row(bin_id, "[%s]%s[/]" % (colour, bar), "-" if fill is None else "%.0f" % fill,
                          "%s" % s.get("temperature_c"), "%.2f V" % s["battery_v"], "%s" % s.get("rssi"),
                          "%.0f s" % (now - seen))
            ev = "\n".join("%s  %-12s %s  fcnt %s" % (e.get("received_at", "")[11:19], e["event"], e["bin_id"], e["fcnt"])
                           for e in self.events) or "(no events yet)"
        return Group(t, Panel(ev, title="recent events"))

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def _metric(port, name):
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
        text = r.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def cmd_demo(args):
    from rich.console import Console
    from rich.live import Live

    from binlink.sim import broker as brokers
    from binlink.sim.fleet import Fleet

    logging.getLogger("binlink.fw").setLevel(logging.WARNING)
    console = Console()
    work = tempfile.mkdtemp(prefix="binlink-demo-")
    broker = None
    gateway = None
    view = None
    fleet = None
    try:
        if args.broker:
            host, _, port = args.broker.rpartition(":")
            host, port = host or "127.0.0.1", int(port)
            console.print("==> using the broker at %s:%d" % (host, port))
        else:
            broker = brokers.embedded(args.embedded)
            console.print("==> starting an embedded MQTT broker (%s) on 127.0.0.1:%d" % (type(broker).__name__, broker.port))
            broker.start()
            host, port = "127.0.0.1", broker.port
        link = os.path.join(work, "radio0")
        registry = os.path.join(work, "devices.toml")
        console.print("==> simulating %d bins (firmware on CPython), radio on the pty %s" % (args.bins, link))
        fleet = Fleet(args.bins, seed=args.seed, fmt=args.format, links=[link], registry_path=registry, speed=args.speed)
        metrics_port = brokers.free_port()
        config = os.path.join(work, "gateway.toml")
        with open(config, "w") as f:
            f.write('[gateway]\nid = "demo"\nsite = "demo"\nregistry = "%s"\nstate_dir = "%s"\nstatus_interval_s = 10\n'
                    '[[source]]\nname = "radio0"\nport = "%s"\nformat = "%s"\n[mqtt]\nhost = "%s"\nport = %d\n'
                    '[metrics]\nlisten = "127.0.0.1:%d"\n' % (registry, os.path.join(work, "state"), link, args.format,
                                                              host, port, metrics_port))
        console.print("==> starting the gateway (log: %s)" % os.path.join(work, "gateway.log"))
        log = open(os.path.join(work, "gateway.log"), "ab")
        gateway = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "binlink"), "gateway", "--config", config],
                                   stdout=log, stderr=subprocess.STDOUT)
        brokers.wait_port(metrics_port, timeout=30, proc=gateway)
        view = View(host, port, "binlink/demo")
        runner = threading.Thread(target=fleet.run, args=(10 * 365 * 86400.0,), daemon=True)
        runner.start()
        deadline = time.monotonic() + args.seconds if args.seconds > 0 else None
        try:
            with Live(view.render(fleet), console=console, refresh_per_second=4) as live:
                while deadline is None or time.monotonic() < deadline:
                    time.sleep(0.25)
                    live.update(view.render(fleet))
        except KeyboardInterrupt:
            pass
        console.print("==> stopping the fleet; waiting for the gateway to publish everything it accepted")
        fleet.stop()
        runner.join(10)
        fleet.links[0].wait_drained(10)
        end = time.monotonic() + 30
        accepted = -1
        while time.monotonic() < end:  # settled: nothing new accepted, outbox empty, view has it all
            now_accepted = _metric(metrics_port, "binlink_readings_accepted_total")
            depth = _metric(metrics_port, "binlink_outbox_depth")
            with view.lock:
                seen = len(view.uplinks)
            if now_accepted == accepted and depth == 0 and seen >= accepted:
                break
            accepted = now_accepted
            time.sleep(0.5)
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(30)
        time.sleep(0.3)
        with view.lock:
            published = len(view.uplinks)
        print(LAST_LINE.format(bins=args.bins, sent=fleet.frames_sent, published=published,
                               lost_on_air=fleet.lost_on_air, lost_after_gateway=max(0, int(accepted) - published)),
              flush=True)
        return 0
    finally:
        if view is not None:
            view.close()
        if gateway is not None and gateway.poll() is None:
            gateway.kill()
        if fleet is not None:
            fleet.close()
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)
