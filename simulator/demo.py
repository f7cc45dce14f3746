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
    p.add_argument("--gateways", type=int, default=1,
                   help="gateways around the town sharing state through a real redis-server (needs it installed)")
    p.set_defaults(func=cmd_demo)


def _sites(n):
    """n gateway sites on a 900 m circle round the centre, each with its own extra loss (x, y, dB):
    with an urban channel some bins are heard by one gateway, some by several, a few by none."""
    import math

    return [(900 * math.cos(math.pi / 2 + 2 * math.pi * i / n), 900 * math.sin(math.pi / 2 + 2 * math.pi * i / n),
             3.0 * (i % 3)) for i in range(n)]


URBAN = {"path_loss_exp": 3.8, "shadowing_db": 8.0}


def _start_redis(work):
    """(process, url) of a real redis-server on a free port, or (None, why not)."""
    from binlink.sim import broker as brokers

    exe = shutil.which("redis-server")
    if exe is None:
        return None, "redis-server is not installed (Debian: apt install redis-server)"
    port = brokers.free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", work], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        brokers.wait_port(port, timeout=10, proc=proc)
    except (RuntimeError, TimeoutError) as e:
        proc.kill()
        return None, "redis-server did not start: %s" % e
    return proc, "redis://127.0.0.1:%d/0" % port


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
    view = None
    fleet = None
    redis_proc, redis_url, gateways = None, "", []  # gateways: (process, metrics port)
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
        n_gw = max(1, args.gateways)
        if n_gw > 1:
            redis_proc, redis_url = _start_redis(work)
            if redis_proc is None:
                console.print("==> running ONE gateway, not %d: %s" % (n_gw, redis_url))
                n_gw, redis_url = 1, ""
            else:
                console.print("==> %d gateways sharing counters, dedup and the registry through redis-server at %s"
                              % (n_gw, redis_url))
        links = [os.path.join(work, "radio%d" % i) for i in range(n_gw)]
        registry = os.path.join(work, "devices.toml")
        console.print("==> simulating %d bins (firmware on CPython), radio on the pty %s" % (args.bins, ", ".join(links)))
        fleet = Fleet(args.bins, seed=args.seed, fmt=args.format, links=links, registry_path=registry, speed=args.speed,
                      **({"sites": _sites(n_gw), "channel": URBAN} if n_gw > 1 else {}))
        if n_gw > 1:
            heard = [len(v) for v in fleet.coverage().values()]
            console.print("==> coverage: " + ", ".join("%d bins heard by %d gateway%s" % (heard.count(k), k, "" if k == 1 else "s")
                                                       for k in range(n_gw + 1) if heard.count(k)))
        for i, link in enumerate(links):
            metrics_port = brokers.free_port()
            config = os.path.join(work, "gateway%d.toml" % i)
            with open(config, "w") as f:
                f.write('[gateway]\nid = "demo%s"\nsite = "demo"\nregistry = "%s"\nstate_dir = "%s"\nstatus_interval_s = 10\n'
                        '[[source]]\nname = "radio0"\nport = "%s"\nformat = "%s"\n[mqtt]\nhost = "%s"\nport = %d\n'
                        '[metrics]\nlisten = "127.0.0.1:%d"\n' % (i or "", registry, os.path.join(work, "state%d" % i), link,
                                                                  args.format, host, port, metrics_port))
                if redis_url:
                    f.write('[redis]\nurl = "%s"\n' % redis_url)
            console.print("==> starting gateway %d (log: %s)" % (i, os.path.join(work, "gateway%d.log" % i)))
            log = open(os.path.join(work, "gateway%d.log" % i), "ab")
            gateway = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "binlink"), "gateway", "--config", config],
                                       stdout=log, stderr=subprocess.STDOUT)
            gateways.append((gateway, metrics_port))
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
        for link in fleet.links:
            link.wait_drained(10)
        end = time.monotonic() + 30
        accepted = -1
        while time.monotonic() < end:  # settled: nothing new accepted, outbox empty, view has it all
            now_accepted = sum(_metric(p, "binlink_readings_accepted_total") for _, p in gateways)
            depth = sum(_metric(p, "binlink_outbox_depth") for _, p in gateways)
            with view.lock:
                seen = len(view.uplinks)
            if now_accepted == accepted and depth == 0 and seen >= accepted:
                break
            accepted = now_accepted
            time.sleep(0.5)
        for g, _ in gateways:
            g.send_signal(signal.SIGTERM)
        for g, _ in gateways:
            g.wait(30)
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
        for g, _ in gateways:
            if g.poll() is None:
                g.kill()
        if redis_proc is not None:
            redis_proc.kill()
        if fleet is not None:
            fleet.close()
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)
