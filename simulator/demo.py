"""`binlink demo`: an embedded broker, a simulated fleet and the real gateway, with a live view.

Everything is real except the bins and the radio: the gateway is its own process reading a
pseudo-terminal through pyserial and publishing to a real broker, which the view subscribes to."""
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

# in frames: sent = published + hellos + repeated + lost_on_air + rejected (repeated: a batch of
# readings stored before, sent again after a lost answer); lost_after_gateway is what the gateway
# accepted that never reached the subscriber (0)
LAST_LINE = ("bins={bins} sent={sent} published={published} hellos={hellos} repeated={repeated} lost_on_air={lost_on_air} "
             "rejected={rejected} lost_after_gateway={lost_after_gateway}")
EVENT_LINES = 8


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
    """(process, [redis] table, where) of a real redis-server on a free port, set up as docs/gateway.md
    §5 says (the default user off, an ACL user with a password, a registry secret; files of mode
    0600), or (None, "", why not)."""
    from binlink.sim import broker as brokers

    exe = shutil.which("redis-server")
    if exe is None:
        return None, "", "redis-server is not installed (Debian: apt install redis-server)"
    port = brokers.free_port()
    password, files = secrets.token_hex(16), {}
    for name, text in (("redis.password", password), ("registry.secret", secrets.token_hex(32)),
                       ("redis.conf", "user default off\nuser binlink on >%s ~binlink:* resetchannels -@all +@read "
                                      "+@write +@scripting +ping +info\n" % password)):
        files[name] = os.path.join(work, name)
        with open(os.open(files[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(text + "\n")
    proc = subprocess.Popen([exe, files["redis.conf"], "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", work], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        brokers.wait_port(port, timeout=10, proc=proc)
    except (RuntimeError, TimeoutError) as e:
        proc.kill()
        return None, "", "redis-server did not start: %s" % e
    table = ('[redis]\nurl = "redis://127.0.0.1:%d/0"\nusername = "binlink"\npassword_file = "%s"\n'
             'registry_secret_file = "%s"\n' % (port, files["redis.password"], files["registry.secret"]))
    return proc, table, "127.0.0.1:%d" % port


class View:
    """What the broker says, collected by a subscriber: bin states and recent events, stamped
    with the simulated time they arrived at (the fleet's clock, not the wall clock)."""

    def __init__(self, host, port, base, sim_clock):
        import paho.mqtt.client as mqtt

        self.sim_clock = sim_clock
        self.states = {}  # bin_id -> (state, simulated time it arrived)
        self.events = []  # (simulated time, event)
        self.frames = set()  # (device, received_at): a frame's readings share it (a batch's, an echo and its frame's own)
        self.hellos = set()
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
        now = self.sim_clock()
        with self.lock:
            if msg.topic.endswith("/state"):
                self.states[data["bin_id"]] = (data, now)
            elif data.get("event") == "uplink":
                self.frames.add((data["device"], data["received_at"]))
            else:
                if data.get("event") == "hello":
                    self.hellos.add(data["message_id"])
                self.events.append((now, data))
                del self.events[:-EVENT_LINES]

    def published_frames(self):
        with self.lock:
            return len(self.frames)

    def render(self, fleet, height):
        """Fits height lines: a summary of every bin, then the fullest bins, then recent events."""
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table

        with self.lock:
            states = dict(self.states)
            events = list(self.events)
        fills = [s.get("fill_pct") for s, _ in states.values()]
        known = [f for f in fills if f is not None]
        rows = max(3, height - EVENT_LINES - 10)  # title, header, borders, summary, event panel frame
        fullest = sorted(states.items(), key=lambda kv: -(kv[1][0].get("fill_pct") or 0))[:rows]
        t = Table(title="binlink demo — %d bins, simulated %s (x%g)" % (
            len(fleet.devices), time.strftime("%a %H:%M", time.localtime(fleet.now)), fleet.speed), expand=True,
            caption="%d reporting · %d full (≥90 %%) · %d nearly (≥75 %%) · mean %.0f %% · the %d fullest shown" % (
                len(states), sum(f >= 90 for f in known), sum(75 <= f < 90 for f in known),
                sum(known) / len(known) if known else 0, len(fullest)))
        for col in ("bin", "fill", "%", "°C", "battery", "RSSI", "seen (sim)"):
            t.add_column(col, justify="right" if col not in ("bin", "fill") else "left")
        for bin_id, (s, seen) in fullest:
            fill = s.get("fill_pct")
            bar = "?" * 20 if fill is None else "█" * int(fill / 5) + "·" * (20 - int(fill / 5))
            colour = "red" if (fill or 0) >= 90 else "yellow" if (fill or 0) >= 75 else "green"
            t.add_row(bin_id, "[%s]%s[/]" % (colour, bar), "-" if fill is None else "%.0f" % fill,
                      "%s" % s.get("temperature_c"), "%.2f V" % s["battery_v"], "%s" % s.get("rssi"),
                      "%.0f min ago" % ((fleet.now - seen) / 60))
        ev = "\n".join("%s  %-12s %s  fcnt %s" % (time.strftime("%a %H:%M", time.localtime(at)), e["event"], e["bin_id"], e["fcnt"])
                       for at, e in events) or "(no events yet)"
        return Group(t, Panel(ev, title="recent events (simulated time)", height=EVENT_LINES + 2))

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


class Leftovers:
    """On a broker the demo did not start: every topic the demo's gateways retain something on
    (bin states, gateway status, Home Assistant discovery), recorded from before they start, so
    that `clear()` can publish an empty retained payload to each when the demo stops. A topic is
    the demo's when it is under binlink/demo/ or its payload names that base (discovery configs)."""

    BASE = "binlink/demo/"

    def __init__(self, host, port, discovery_prefix="homeassistant"):
        import paho.mqtt.client as mqtt

        self.topics = set()
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="binlink-demo-cleanup-%d" % os.getpid())
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe([(self.BASE + "#", 1), (discovery_prefix + "/#", 1)])
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_message = self._on_message
        self.c.connect(host, port)
        self.c.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("the broker at %s:%d did not take a subscription" % (host, port))

    def _on_message(self, client, userdata, msg):
        if msg.payload and (msg.topic.startswith(self.BASE) or self.BASE.encode() in msg.payload):
            with self.lock:
                self.topics.add(msg.topic)

    def clear(self, timeout_s=10.0):
        """Empty retained payloads to every recorded topic, each acknowledged (QoS 1); returns how many."""
        self.c.on_message = None  # our own clears are not leftovers
        with self.lock:
            topics = sorted(self.topics)
        infos = [self.c.publish(t, b"", qos=1, retain=True) for t in topics]
        deadline = time.monotonic() + timeout_s
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        done = sum(info.is_published() for info in infos)
        self.c.loop_stop()
        self.c.disconnect()
        return done, len(topics)


def _metrics(port):
    """name -> {labels: value} from the gateway's endpoint; {} when it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _total(metrics, name, exclude_reasons=()):
    return int(sum(v for labels, v in metrics.get(name, {}).items() if dict(labels).get("reason") not in exclude_reasons))


def _metrics_of(ports):
    """The gateways' metrics added up: name -> {labels: value}."""
    out = {}
    for port in ports:
        for name, samples in _metrics(port).items():
            for labels, v in samples.items():
                out.setdefault(name, {})[labels] = out.get(name, {}).get(labels, 0) + v
    return out


def _prctl():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _prctl()


def _with_the_demo():
    """A gateway's preexec_fn: the kernel sends it SIGTERM if the demo dies first, however it dies
    (Linux PR_SET_PDEATHSIG), so a demo killed outright leaves no gateway reopening its pty."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)


def _settle(metrics_ports, view, timeout_s=30):
    """Waits until nothing new is accepted, the outboxes are empty and the view has every frame;
    returns the gateways' metrics added up."""
    end = time.monotonic() + timeout_s
    metrics, accepted, still = {}, -1, 0
    while time.monotonic() < end:
        metrics = _metrics_of(metrics_ports)
        now_accepted = _total(metrics, "binlink_frames_accepted_total")
        seen = view.published_frames() + len(view.hellos) + _total(metrics, "binlink_frames_repeated_total")
        # unchanged over three looks (1.5 s), not one: a gateway starved of CPU on a loaded host may
        # still hold frames it read from the line and has not committed yet
        still = still + 1 if now_accepted == accepted else 0
        if still >= 3 and _total(metrics, "binlink_outbox_depth") == 0 and seen >= accepted:
            break
        accepted = now_accepted
        time.sleep(0.5)
    return metrics


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
    redis_proc, redis_table, gateways = None, "", []  # gateways: (process, metrics port)
    leftovers = None
    try:
        if args.broker:
            host, _, port = args.broker.rpartition(":")
            host, port = host or "127.0.0.1", int(port)
            console.print("==> using the broker at %s:%d: the simulated bins' retained states and Home Assistant "
                          "discovery are removed from it when the demo stops" % (host, port))
            leftovers = Leftovers(host, port)
        else:
            broker = brokers.embedded(args.embedded)
            console.print("==> starting an embedded MQTT broker (%s) on 127.0.0.1:%d" % (type(broker).__name__, broker.port))
            broker.start()
            host, port = "127.0.0.1", broker.port
        n_gw = max(1, args.gateways)
        if n_gw > 1:
            redis_proc, redis_table, where = _start_redis(work)
            if redis_proc is None:
                console.print("==> running ONE gateway, not %d: %s" % (n_gw, where))
                n_gw, redis_table = 1, ""
            else:
                console.print("==> %d gateways sharing counters, dedup and the registry through redis-server at %s"
                              % (n_gw, where))
        links = [os.path.join(work, "radio%d" % i) for i in range(n_gw)]
        registry = os.path.join(work, "devices.toml")
        console.print("==> simulating %d bins (firmware on CPython), radio on the pty %s" % (args.bins, ", ".join(links)))
        fleet = Fleet(args.bins, seed=args.seed, fmt=args.format, links=links, registry_path=registry, speed=args.speed,
                      clock_file=os.path.join(work, "simclock"),  # the gateways live on simulated time (forecasts)
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
                        'allow_volatile_state = true\n'  # the demo's state is thrown away; /tmp may be a tmpfs
                        '[[source]]\nname = "radio0"\nport = "%s"\nformat = "%s"\n[mqtt]\nhost = "%s"\nport = %d\n'
                        '[metrics]\nlisten = "127.0.0.1:%d"\n' % (i or "", registry, os.path.join(work, "state%d" % i), link,
                                                                  args.format, host, port, metrics_port))
                f.write(redis_table)
            console.print("==> starting gateway %d (log: %s)" % (i, os.path.join(work, "gateway%d.log" % i)))
            log = open(os.path.join(work, "gateway%d.log" % i), "ab")
            # its own session, as the broker's: Ctrl-C reaches the demo only, which then stops them in order
            gateway = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "binlink"), "gateway", "--config", config],
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_with_the_demo,
                                       env=dict(os.environ, BINLINK_SIM_CLOCK=os.path.join(work, "simclock")))
            gateways.append((gateway, metrics_port))
            brokers.wait_port(metrics_port, timeout=30, proc=gateway)
        console.print("==> a planner on the simulation's clock (list, routes, page): binlink planner --host %s --port %d --site demo "
                      "--sim-clock %s --trucks 2 --http 127.0.0.1:8021" % (host, port, os.path.join(work, "simclock")))
        view = View(host, port, "binlink/demo", lambda: fleet.now)
        runner = threading.Thread(target=fleet.run, args=(10 * 365 * 86400.0,), daemon=True)
        runner.start()
        deadline = time.monotonic() + args.seconds if args.seconds > 0 else None
        try:
            with Live(view.render(fleet, console.size.height), console=console, refresh_per_second=4,
                      vertical_overflow="crop") as live:
                while deadline is None or time.monotonic() < deadline:
                    time.sleep(0.25)
                    live.update(view.render(fleet, console.size.height))
        except KeyboardInterrupt:
            pass
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the summary short
        console.print("==> stopping the fleet; waiting for the gateway to publish everything it accepted")
        fleet.stop()
        runner.join(10)
        for link in fleet.links:
            link.wait_drained(10)
        metrics = _settle([p for _, p in gateways], view)
        for g, _ in gateways:
            g.send_signal(signal.SIGTERM)
        for g, _ in gateways:
            g.wait(30)
        time.sleep(0.3)
        accepted = _total(metrics, "binlink_frames_accepted_total")
        published, hellos = view.published_frames(), len(view.hellos)
        repeated = _total(metrics, "binlink_frames_repeated_total")
        print(LAST_LINE.format(bins=args.bins, sent=fleet.frames_sent, published=published, hellos=hellos, repeated=repeated,
                               lost_on_air=fleet.lost_on_air,
                               # intact frames the gateway refused; corrupted ones (crc) are lost on air
                               rejected=_total(metrics, "binlink_frames_rejected_total", exclude_reasons=("crc",)),
                               lost_after_gateway=max(0, accepted - published - hellos - repeated)), flush=True)
        return 0
    except KeyboardInterrupt:  # before the live view was up: nothing to summarise
        console.print("==> interrupted while starting; stopped")
        return 130
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
        if leftovers is not None:  # the gateways are stopped: nothing republishes what is cleared
            done, total = leftovers.clear()
            console.print("==> removed %d of %d retained messages the demo left on the broker at %s (bin states, "
                          "gateway status, Home Assistant discovery)%s" % (done, total, args.broker,
                                                                           "" if done == total else ": not all acknowledged"))
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)
