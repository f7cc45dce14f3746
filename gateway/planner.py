"""The collection list: which bins to empty on the next round, most urgent first.

`binlink planner` is a small service of its own that reads the bins' retained states over MQTT
and publishes one retained list at <base>/plan. It sits behind the broker, not inside a gateway,
so it works the same with one gateway or several: it sees every bin whichever gateway heard it,
and there is exactly one writer of the list (gateways each publishing a list would overwrite one
another with partial ones). `binlink plan` prints the list.

A bin is on the list when its forecast says it reaches full before the round after the next one
(the trucks that go out next are the last chance to empty it), when it is full already, or when
it has no forecast yet (new, or just restarted learning) but is fuller than `unknown_fill_pct`."""
import json
import logging
import sys
import threading
import time
from datetime import datetime, timezone

DAY = 86400.0
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_iso(text):
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def iso(ts):
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class Routes:
    """Route days (0 = Monday) and the hour (UTC) trucks leave."""

    def __init__(self, days=(0, 1, 2, 3, 4, 5), hour=7.0):
        if not days or any(d not in range(7) for d in days):
            raise ValueError("route days must be weekdays 0..6 (Monday = 0), got %r" % (days,))
        self.days = tuple(sorted(set(days)))
        self.hour = hour

    @classmethod
    def parse(cls, days_text, hour):
        try:
            days = [WEEKDAYS.index(d.strip().lower()[:3]) for d in days_text.split(",") if d.strip()]
        except ValueError:
            raise ValueError("route days: expected names like mon,tue,...; got %r" % days_text) from None
        return cls(days, hour)

    def next_after(self, t):
        """The first round strictly after t."""
        day0 = t // DAY * DAY
        for k in range(8):
            start = day0 + k * DAY + self.hour * 3600
            if start > t and int(start // DAY + 3) % 7 in self.days:
                return start
        raise AssertionError("unreachable: a week holds every route day")


def plan(states, now, horizon, unknown_fill_pct=70.0, full_pct=100.0):
    """states: {bin_id: retained state dict}. Bins due before `horizon` (UTC seconds), most urgent first."""
    due = []
    for bin_id, s in states.items():
        fill = s.get("fill_pct")
        full_at = parse_iso(s.get("full_at"))
        if fill is not None and fill >= full_pct:
            reason, when = "full", now
        elif full_at is not None and full_at <= horizon:
            reason, when = "forecast", full_at
        elif full_at is None and fill is not None and fill >= unknown_fill_pct:
            reason, when = "no_forecast", now
        else:
            continue
        due.append((when, -(fill or 0.0), bin_id, reason, s))
    due.sort(key=lambda x: x[:3])
    return [{"bin_id": bin_id, "name": s.get("name"), "lat": s.get("lat"), "lon": s.get("lon"), "fill_pct": s.get("fill_pct"),
             "full_at": s.get("full_at"), "fill_rate_pct_per_day": s.get("fill_rate_pct_per_day"), "reason": reason,
             "measured_at": s.get("measured_at")}
            for _, _, bin_id, reason, s in due]


def plan_message(states, now, routes, margin_s, unknown_fill_pct=70.0):
    """The retained list: for the next round, bins due before the round after it (plus a margin)."""
    next_round = routes.next_after(now)
    horizon = routes.next_after(next_round) + margin_s
    bins = plan(states, now, horizon, unknown_fill_pct)
    return {"next_round": iso(next_round), "horizon": iso(horizon), "bins_known": len(states), "bins": bins}


def plan_topic(base):
    return "%s/plan" % base


def mqtt_client(m, client_id):
    """A paho client with the gateway config's [mqtt] credentials and TLS."""
    import paho.mqtt.client as mqtt

    from binlink.gateway import config

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    config.apply_mqtt_settings(c, m)
    return c


class Planner:
    """Subscribes to <base>/bin/+/state, publishes <base>/plan (retained) when it changes, at most
    every `interval_s`, and at least when a round starts."""

    def __init__(self, mqtt_cfg, base, routes, margin_s=6 * 3600.0, interval_s=60.0, unknown_fill_pct=70.0, clock=time.time):
        self.base = base
        self.routes = routes
        self.margin_s = margin_s
        self.interval_s = interval_s
        self.unknown_fill_pct = unknown_fill_pct
        self.clock = clock
        self.states = {}
        self.changed = threading.Event()
        self.stopping = threading.Event()
        self.log = logging.getLogger("binlink.planner")
        self.client = mqtt_client(mqtt_cfg, "binlink-planner-%s" % base.replace("/", "-"))
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.mqtt_cfg = mqtt_cfg
        self._last = None

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            client.subscribe("%s/bin/+/state" % self.base, qos=1)

    def _on_message(self, client, userdata, msg):
        try:
            s = json.loads(msg.payload)
            bin_id = s["bin_id"]
        except (ValueError, KeyError, TypeError):
            self.log.warning("ignored a state that is not binlink JSON on %s", msg.topic)
            return
        old = self.states.get(bin_id)
        # two gateways may deliver out of order: the newer measurement wins
        if old is None or (s.get("measured_at") or "") >= (old.get("measured_at") or ""):
            self.states[bin_id] = s
            self.changed.set()

    def publish_once(self):
        body = plan_message(dict(self.states), self.clock(), self.routes, self.margin_s, self.unknown_fill_pct)
        key = json.dumps([body["next_round"], body["bins_known"], body["bins"]], sort_keys=True)
        if key == self._last:
            return False
        self._last = key
        body["generated_at"] = iso(self.clock())
        self.client.publish(plan_topic(self.base), json.dumps(body, sort_keys=True), qos=1, retain=True)
        return True

    def run(self):
        self.client.connect(self.mqtt_cfg.host, self.mqtt_cfg.port, keepalive=self.mqtt_cfg.keepalive)
        self.client.loop_start()
        try:
            while not self.stopping.is_set():
                self.changed.wait(self.interval_s)
                self.changed.clear()
                self.publish_once()
                self.stopping.wait(min(self.interval_s, 1.0))
        finally:
            self.client.loop_stop()
            self.client.disconnect()

    def stop(self, *_):
        self.stopping.set()
        self.changed.set()


# command line ----------------------------------------------------------------------------------
def add_parsers(sub):
    p = sub.add_parser("planner", help="publish the collection list (retained <base>/plan) from the bins' states")
    _common(p)
    p.add_argument("--route-days", default="mon,tue,wed,thu,fri,sat", help="days the trucks go out (default: %(default)s)")
    p.add_argument("--route-hour", type=float, default=7.0, help="hour (UTC) the round starts (default: %(default)s)")
    p.add_argument("--margin-h", type=float, default=6.0, help="safety margin after the horizon, hours (default: %(default)s)")
    p.add_argument("--unknown-fill-pct", type=float, default=70.0, help="bins without a forecast yet go on the list from this fill")
    p.add_argument("--interval", type=float, default=60.0, help="publish at most this often, seconds (default: %(default)s)")
    p.set_defaults(func=cmd_planner)
    v = sub.add_parser("plan", help="print the collection list the planner published")
    _common(v)
    v.add_argument("--json", action="store_true", help="print the message as JSON")
    v.add_argument("--timeout", type=float, default=5.0)
    v.set_defaults(func=cmd_plan)


def _common(p):
    p.add_argument("--config", help="gateway TOML: its [mqtt] settings and site are used")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--site", default=None)


def _mqtt_and_base(args):
    from binlink.gateway import config

    if args.config:
        cfg = config.load(args.config)
        m, base = cfg.mqtt, cfg.base_topic
    else:
        m, base = config.Mqtt(), "binlink/%s" % (args.site or "default")
    if args.host:
        m.host = args.host
    if args.port:
        m.port = args.port
    if args.site:
        base = "binlink/%s" % args.site
    return m, base


def cmd_planner(args):
    import signal

    from binlink.gateway import config

    try:
        m, base = _mqtt_and_base(args)
        routes = Routes.parse(args.route_days, args.route_hour)
    except (ValueError, config.ConfigError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    planner = Planner(m, base, routes, args.margin_h * 3600, args.interval, args.unknown_fill_pct)
    signal.signal(signal.SIGTERM, planner.stop)
    signal.signal(signal.SIGINT, planner.stop)
    print("planner: %s -> %s" % ("%s/bin/+/state" % base, plan_topic(base)), flush=True)
    planner.run()
    return 0


def cmd_plan(args):
    from binlink.gateway import config

    try:
        m, base = _mqtt_and_base(args)
    except config.ConfigError as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    got = threading.Event()
    box = []
    c = mqtt_client(m, "binlink-plan-view-%d" % (time.time() * 1000 % 1_000_000))
    c.on_connect = lambda client, *a: client.subscribe(plan_topic(base), qos=1)
    c.on_message = lambda client, userdata, msg: (box.append(msg.payload), got.set())
    try:
        c.connect(m.host, m.port)
    except OSError as e:
        print("error: cannot reach the broker at %s:%d: %s" % (m.host, m.port, e), file=sys.stderr)
        return 2
    c.loop_start()
    ok = got.wait(args.timeout)
    c.loop_stop()
    c.disconnect()
    if not ok:
        print("no collection list at %s (is `binlink planner` running?)" % plan_topic(base), file=sys.stderr)
        return 1
    body = json.loads(box[0])
    if args.json:
        print(json.dumps(body, indent=1, sort_keys=True))
        return 0
    print(format_plan(body))
    return 0


def format_plan(body):
    lines = ["next round %s, bins due before %s: %d of %d" % (body["next_round"], body["horizon"], len(body["bins"]), body["bins_known"]),
             "%-3s %-16s %6s %-21s %9s %-11s %s" % ("#", "bin", "fill%", "full at", "%/day", "why", "position")]
    for i, b in enumerate(body["bins"], 1):
        pos = "%.5f,%.5f" % (b["lat"], b["lon"]) if b.get("lat") is not None else "-"
        lines.append("%-3d %-16s %6s %-21s %9s %-11s %s" % (
            i, b["bin_id"], "-" if b["fill_pct"] is None else "%.1f" % b["fill_pct"], b["full_at"] or "-",
            "-" if b["fill_rate_pct_per_day"] is None else "%.1f" % b["fill_rate_pct_per_day"], b["reason"], pos))
    return "\n".join(lines)
