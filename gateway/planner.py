"""The collection list: which bins to empty on the next round, most urgent first, and the trucks'
routes through them.

`binlink planner` is a small service of its own that reads the bins' retained states over MQTT
and publishes one retained list at <base>/plan. It sits behind the broker, not inside a gateway,
so it works the same with one gateway or several: it sees every bin whichever gateway heard it,
and there is exactly one writer of the list (gateways each publishing a list would overwrite one
another with partial ones). `binlink plan` prints the list (planner_cli.py).

Words, one meaning each:
- full: the site's `events.full_pct` (the gateway's `full` event, its `full_at` forecast);
- listed: full already; or forecast to be full before the round after the next one (plus a
  margin: the trucks that go out next are the last chance to empty it); or no forecast yet (new,
  or just restarted learning) but at least `unknown_fill_pct`;
- quiet: silent for more than `stale_s`. Its last reading is not trusted: it is neither listed nor
  routed, but named under `quiet` with its age, for someone to look at.
Round times are in the site's time zone (zoneinfo): 07:00 stays 07:00 across daylight saving."""
import json
import logging
import random
import threading
import time
from datetime import datetime, time as dtime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAY = 86400.0
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
FULL_PCT = 90.0  # config.Events.full_pct's default: the planner without a gateway config
STALE_S = 12 * 3600.0
# time added after the round after next: none by default, as full (90 %) already stops a tenth of
# a bin short of its brim; 6 h was the margin when full meant the brim (docs/planner.md measures both)
MARGIN_S = 0.0
HOT_EVERY_S = 600.0
log = logging.getLogger("binlink.planner")


def parse_iso(text):
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def iso(ts):
    """UTC seconds as ISO 8601, 'Z' for UTC: the second ts falls in (a fraction is dropped, never
    rounded up into the next second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def zone(name):
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("time zone: %r is not an IANA zone name (e.g. Europe/Berlin, UTC)" % name) from None


class Routes:
    """Route days (0 = Monday) and the local time trucks leave, in the site's time zone."""

    def __init__(self, days=(0, 1, 2, 3, 4, 5), hour=7.0, tz="UTC"):
        if not days or any(d not in range(7) for d in days):
            raise ValueError("route days must be weekdays 0..6 (Monday = 0), got %r" % (days,))
        if not isinstance(hour, (int, float)) or not 0 <= hour < 24:
            raise ValueError("route hour must be from 0 to below 24 (local time), got %r" % (hour,))
        self.days = tuple(sorted(set(days)))
        self.hour = float(hour)
        self.tz = zone(tz) if isinstance(tz, str) else tz
        minutes = int(round(self.hour * 60))
        self._at = dtime(minutes // 60 % 24, minutes % 60)

    @classmethod
    def parse(cls, days_text, hour, tz="UTC"):
        try:
            days = [WEEKDAYS.index(d.strip().lower()[:3]) for d in days_text.split(",") if d.strip()]
        except ValueError:
            raise ValueError("route days: expected names like mon,tue,...; got %r" % days_text) from None
        return cls(days, hour, tz)

    def start(self, day):
        """The round's start (UTC seconds) on a local date."""
        return datetime.combine(day, self._at, tzinfo=self.tz).timestamp()

    def next_after(self, t):
        """The first round strictly after t."""
        today = datetime.fromtimestamp(t, self.tz).date()
        for k in range(9):
            day = today + timedelta(days=k)
            if day.weekday() in self.days:
                start = self.start(day)
                if start > t:
                    return start
        raise AssertionError("unreachable: a week holds every route day")

    def local(self, t, fmt="%a %d %b %H:%M"):
        return datetime.fromtimestamp(t, self.tz).strftime(fmt)


def _age_h(now, measured):
    return None if measured is None else round(max(0.0, now - measured) / 3600.0, 1)


def merge_state(old, new):
    """A bin's state as the planner keeps it: the newer measurement wins (two gateways may deliver
    out of order); a reading without a fill (a sensor fault: an overfull bin often reads nothing)
    keeps the last valid fill as `last_fill_pct`, so the bin is judged by it, not forgotten."""
    if old is not None and (new.get("measured_at") or "") < (old.get("measured_at") or ""):
        return old
    if new.get("fill_pct") is None and old is not None:
        last = old.get("fill_pct") if old.get("fill_pct") is not None else old.get("last_fill_pct")
        if last is not None:
            return dict(new, last_fill_pct=last)
    return new


def plan(states, now, horizon, unknown_fill_pct=70.0, full_pct=FULL_PCT, stale_s=STALE_S, routes=None):
    """states: {bin_id: retained state dict}. Returns (listed, quiet): bins due before `horizon`
    (UTC seconds), most urgent first, and bins silent for more than stale_s (oldest first)."""
    due, quiet = [], []
    for bin_id, s in states.items():
        fill = s.get("fill_pct")
        no_reading = fill is None and s.get("last_fill_pct") is not None
        if no_reading:  # the sensor reads nothing now: judged by its last valid fill, and said so
            fill = s["last_fill_pct"]
        measured = parse_iso(s.get("measured_at"))
        full_at = parse_iso(s.get("full_at"))
        age = _age_h(now, measured)
        if stale_s is not None and (measured is None or now - measured > stale_s):
            quiet.append((-(age or 1e9), bin_id, _entry(bin_id, s, age, "quiet", "silent %s: last reading not trusted"
                                                          % ("ever" if age is None else "for %.0f h" % age))))
            continue
        if fill is not None and fill >= full_pct:
            reason, when, why = "full", now, "full: %.0f %% >= %g %%" % (fill, full_pct)
        elif full_at is not None and full_at <= horizon:
            reason, when = "forecast", full_at
            why = "full (%g %%) by %s" % (full_pct, routes.local(full_at) if routes else iso(full_at))
        elif full_at is None and fill is not None and fill >= unknown_fill_pct:
            reason, when, why = "no_forecast", now, "no forecast yet, %.0f %% >= %g %%" % (fill, unknown_fill_pct)
        else:
            continue
        if no_reading:
            why += " (last valid reading: the sensor reads nothing now)"
        due.append((when, -(fill or 0.0), bin_id, _entry(bin_id, s, age, reason, why)))
    due.sort(key=lambda x: x[:3])
    quiet.sort(key=lambda x: x[:2])
    return [e for *_, e in due], [e for *_, e in quiet]


def _entry(bin_id, s, age_h, reason, why):
    return {"bin_id": bin_id, "name": s.get("name"), "lat": s.get("lat"), "lon": s.get("lon"), "fill_pct": s.get("fill_pct"),
            "full_at": s.get("full_at"), "fill_rate_pct_per_day": s.get("fill_rate_pct_per_day"), "reason": reason,
            "why": why, "measured_at": s.get("measured_at"), "age_h": age_h}


def plan_message(states, now, routes, margin_s, unknown_fill_pct=70.0, full_pct=FULL_PCT, stale_s=STALE_S,
                 trucks=None, matrix=None, solved=None, hot_spots=None):
    """The retained list: for the next round, bins due before the round after it (plus a margin);
    with `trucks` (routes.Trucks), the trucks' routes through them. solved: a previous message's
    routes, reused when the same bins are listed (the solver runs when the list changes)."""
    next_round = routes.next_after(now)
    horizon = routes.next_after(next_round) + margin_s
    bins, quiet = plan(states, now, horizon, unknown_fill_pct, full_pct, stale_s, routes)
    body = {"next_round": iso(next_round), "next_round_local": routes.local(next_round, "%Y-%m-%d %H:%M %Z"), "tz": str(routes.tz),
            "horizon": iso(horizon), "bins_known": len(states), "full_pct": full_pct, "stale_h": None if stale_s is None else stale_s / 3600,
            "bins": bins, "quiet": quiet}
    if hot_spots is not None:
        body["hot_spots"] = hot_spots  # bins that overflowed again and again (history.hot_spots)
    if trucks is not None:
        ids = sorted(b["bin_id"] for b in bins)
        if solved is not None and solved.get("bin_ids") == ids:
            body["routes"] = solved
        else:
            try:
                body["routes"] = route_plan(bins, next_round, trucks, matrix)
            except ValueError as e:  # a distance matrix without a listed bin: the list still goes out, saying why
                body["routes_error"] = str(e)
    return body


def route_plan(bins, start, trucks, matrix=None):
    from binlink.gateway import routes as solver

    t = time.perf_counter()
    r = solver.solve(bins, trucks, matrix)
    by_id = {b["bin_id"]: b for b in bins}
    for truck in r["trucks"]:
        for stop in truck["stops"]:
            b = by_id[stop["bin_id"]]
            stop.update(arrive=iso(start + stop.pop("arrive_s")), name=b.get("name"), lat=b.get("lat"), lon=b.get("lon"),
                        fill_pct=b.get("fill_pct"))
    depot = solver.problem(bins, trucks, matrix)[1][0]
    r.update(bin_ids=sorted(by_id), depot=None if depot is None else list(depot), list_order_km=solver.list_order_km(bins, trucks, matrix),
             solve_s=round(time.perf_counter() - t, 3), trucks_available=trucks.count, capacity_bins=trucks.capacity_bins)
    return r


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
    every `interval_s`, and at least when a round starts. `settings`: plan_message's keyword
    arguments (unknown_fill_pct, full_pct, stale_s, trucks, matrix)."""

    def __init__(self, mqtt_cfg, base, routes, margin_s=MARGIN_S, interval_s=60.0, clock=time.time, history=None,
                 **settings):
        self.base = base
        self.history = history  # history.History: every state kept, hot spots named
        self._hot = (None, None)  # (computed at, list)
        self.routes = routes
        self.margin_s = margin_s
        self.interval_s = interval_s
        self.settings = settings
        self.clock = clock
        self.states = {}
        self.changed = threading.Event()
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.client = mqtt_client(mqtt_cfg, "binlink-planner-%s" % base.replace("/", "-"))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 30)
        self.mqtt_cfg = mqtt_cfg
        self._last = None
        self._solved = None
        self.last_body = None  # the latest list computed (the page shows it)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("broker %s:%d refused the planner: %s", self.mqtt_cfg.host, self.mqtt_cfg.port, reason_code)
            return
        log.info("connected to the broker at %s:%d", self.mqtt_cfg.host, self.mqtt_cfg.port)
        client.subscribe("%s/bin/+/state" % self.base, qos=1)
        self.connected.set()
        self._last = None  # published again on every session: one published while away may be lost
        self.changed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if self.connected.is_set() and not self.stopping.is_set():
            log.warning("lost the broker at %s:%d (%s): reconnecting with back-off", self.mqtt_cfg.host, self.mqtt_cfg.port, reason_code)
        self.connected.clear()

    def _on_message(self, client, userdata, msg):
        try:
            s = json.loads(msg.payload)
            bin_id = s["bin_id"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a state that is not binlink JSON on %s", msg.topic)
            return
        old = self.states.get(bin_id)
        new = merge_state(old, s)
        if new is not old:
            self.states[bin_id] = new
            self.changed.set()
        if self.history is not None:
            self.history.add(s)

    def hot_spots(self, now):
        """From the history, at most every HOT_EVERY_S (28 days of every bin is a second's work)."""
        if self.history is None:
            return None
        at, hot = self._hot
        if at is None or abs(now - at) >= HOT_EVERY_S:
            from binlink.gateway import history

            self.history.flush(now)
            hot = history.hot_spots(self.history, now)
            self._hot = (now, hot)
        return hot

    def message(self):
        now = self.clock()
        body = plan_message(dict(self.states), now, self.routes, self.margin_s, solved=self._solved,
                            hot_spots=self.hot_spots(now), **self.settings)
        self._solved = body.get("routes")
        return body

    def publish_once(self):
        body = self.last_body = self.message()
        key = json.dumps([body["next_round"], body["bins_known"], body["bins"], body["quiet"], body.get("routes"), body.get("hot_spots"),
                          body.get("routes_error")], sort_keys=True)
        if key == self._last or not self.connected.is_set():
            return False
        body["generated_at"] = iso(self.clock())
        info = self.client.publish(plan_topic(self.base), json.dumps(body, sort_keys=True), qos=1, retain=True)
        if info.rc != 0:
            return False  # not connected after all: published again on the next session
        self._last = key
        if body.get("routes_error"):
            log.error("no routes for this list: %s", body["routes_error"])
        counts = {}
        for b in body["bins"]:
            counts[b["reason"]] = counts.get(b["reason"], 0) + 1
        r = body.get("routes")
        log.info("published %s: round %s, %d of %d bins listed (%s), %d quiet%s", plan_topic(self.base), body["next_round_local"],
                 len(body["bins"]), body["bins_known"], ", ".join("%s %d" % kv for kv in sorted(counts.items())) or "none",
                 len(body["quiet"]), "" if r is None else ", %d trucks %.1f km, %d unrouted" % (len(r["trucks"]), r["km"], len(r["unrouted"])))
        return True

    def connect(self, max_delay=30.0):
        """Reaches the broker, retrying with back-off (1, 2, 4 ... max_delay s, jittered) while it
        is down: one log line when it first fails and one when it is reached, never a traceback.
        False when stopped first. After this, paho reconnects on its own (reconnect_delay_set)."""
        delay, failures = 1.0, 0
        while not self.stopping.is_set():
            try:
                self.client.connect(self.mqtt_cfg.host, self.mqtt_cfg.port, keepalive=self.mqtt_cfg.keepalive)
            except OSError as e:
                if failures == 0:
                    log.warning("broker %s:%d unreachable (%s): retrying with back-off up to %.0f s",
                                self.mqtt_cfg.host, self.mqtt_cfg.port, e.strerror or e, max_delay)
                failures += 1
                self.stopping.wait(delay * random.uniform(0.5, 1.0))
                delay = min(max_delay, delay * 2)
                continue
            if failures:
                log.info("broker %s:%d reached after %d failed attempts", self.mqtt_cfg.host, self.mqtt_cfg.port, failures)
            return True
        return False

    def run(self):
        if not self.connect():
            return
        self.client.loop_start()
        try:
            while not self.stopping.is_set():
                self.changed.wait(self.interval_s)
                self.changed.clear()
                self.publish_once()
                if self.history is not None:
                    self.history.flush(self.clock())
                self.stopping.wait(min(self.interval_s, 1.0))
        finally:
            self.client.loop_stop()
            self.client.disconnect()
            if self.history is not None:
                self.history.close()

    def stop(self, *_):
        self.stopping.set()
        self.changed.set()


def add_parsers(sub):
    from binlink.gateway import planner_cli

    planner_cli.add_parsers(sub)
