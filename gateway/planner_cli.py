"""`binlink planner` (the service) and `binlink plan` (the list printed, exported for fleet
software as CSV or GeoJSON). The planner's rules are in planner.py, the routes in routes.py."""
import csv
import json
import logging
import sys
import threading
import time

from binlink.gateway import planner
from binlink.gateway.planner import plan_topic


def add_parsers(sub):
    p = sub.add_parser("planner", help="publish the collection list and routes (retained <base>/plan) from the bins' states")
    _common(p)
    p.add_argument("--route-days", default="mon,tue,wed,thu,fri,sat", help="days the trucks go out (default: %(default)s)")
    p.add_argument("--route-hour", type=float, default=7.0, help="local hour the round starts, 0 to below 24 (default: %(default)s)")
    p.add_argument("--tz", default="UTC", help="the site's time zone, an IANA name such as Europe/Berlin (default: %(default)s)")
    p.add_argument("--margin-h", type=float, default=planner.MARGIN_S / 3600,
                   help="safety margin after the horizon, hours (default: %(default)s: full is short of the brim)")
    p.add_argument("--full-pct", type=float, default=None,
                   help="what full means, in %%%% (default: the gateway config's [events] full_pct, else %g)" % planner.FULL_PCT)
    p.add_argument("--unknown-fill-pct", type=float, default=70.0, help="bins without a forecast yet go on the list from this fill")
    p.add_argument("--stale-h", type=float, default=planner.STALE_S / 3600,
                   help="a bin silent longer than this is quiet: not trusted, not listed (default: %(default)s)")
    p.add_argument("--interval", type=float, default=60.0, help="publish at most this often, seconds (default: %(default)s)")
    p.add_argument("--trucks", type=int, default=0, help="trucks per round; 0: no routes (default: %(default)s)")
    p.add_argument("--truck-capacity", type=float, default=40.0, help="full bins' worth a truck carries (default: %(default)s)")
    p.add_argument("--depot", help="LAT,LON the trucks leave from and return to (default: the centre of the bins)")
    p.add_argument("--shift-h", type=float, default=8.0, help="working hours a round may take (default: %(default)s)")
    p.add_argument("--speed-kmh", type=float, default=25.0, help="average truck speed (default: %(default)s)")
    p.add_argument("--service-min", type=float, default=2.0, help="minutes to empty a bin (default: %(default)s)")
    p.add_argument("--distance-matrix", help="CSV of metres between bins (header ids; the depot is 'depot'), instead of straight lines")
    p.add_argument("--history", metavar="FILE", help="keep every published state here (SQLite): hot spots in the list, "
                                                     "and `binlink report` builds the site's report from it")
    p.add_argument("--http", metavar="HOST:PORT", help="serve the planner's page (bins on a map, routes, hot spots, quiet sensors)")
    p.add_argument("--sim-clock", help="a simulator's clock file (binlink sim --clock-file): rounds on simulated time")
    p.set_defaults(func=cmd_planner)
    v = sub.add_parser("plan", help="print the collection list and routes the planner published")
    _common(v)
    v.add_argument("--json", action="store_true", help="print the message as JSON")
    v.add_argument("--csv", metavar="FILE", help="also write the routes' stops as CSV (truck, stop, bin, position, fill, arrival)")
    v.add_argument("--geojson", metavar="FILE", help="also write bins and routes as GeoJSON (points and lines)")
    v.add_argument("--timeout", type=float, default=5.0)
    v.set_defaults(func=cmd_plan)
    r = sub.add_parser("report", help="the report of a real site from the planner's history (as `binlink sim --report`)")
    r.add_argument("--history", required=True, metavar="FILE", help="the planner's --history file")
    r.add_argument("--out", required=True, metavar="FILE", help="the HTML report to write")
    r.add_argument("--days", type=float, default=30.0, help="days up to the newest reading (default: %(default)s)")
    r.add_argument("--full-pct", type=float, default=planner.FULL_PCT, help="the site's full, %% (default: %(default)s)")
    r.add_argument("--stale-h", type=float, default=planner.STALE_S / 3600, help="quiet after this many hours (default: %(default)s)")
    r.add_argument("--chart-bins", type=int, default=12, help="bins charted, the most overflowing first (default: %(default)s)")
    r.set_defaults(func=cmd_report)


def _common(p):
    p.add_argument("--config", help="gateway TOML: its [mqtt] settings, site and [events] full_pct are used")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--site", default=None)


def _settings(args):
    """(mqtt, base, full_pct) from --config and the options."""
    from binlink.gateway import config

    full_pct = None
    if args.config:
        cfg = config.load(args.config)
        m, base, full_pct = cfg.mqtt, cfg.base_topic, cfg.events.full_pct
    else:
        m, base = config.Mqtt(), "binlink/%s" % (args.site or "default")
    if args.host:
        m.host = args.host
    if args.port:
        m.port = args.port
    if args.site:
        base = "binlink/%s" % args.site
    return m, base, full_pct


def _between(name, v, lo, hi, lo_open=False):
    if not ((lo < v) if lo_open else (lo <= v)) or not v <= hi:
        raise ValueError("%s must be %s %g and at most %g, got %g" % (name, "above" if lo_open else "at least", lo, hi, v))
    return v


def planner_from_args(args, clock=None):
    """A Planner from the command line; ValueError/ConfigError name the setting that is wrong."""
    from binlink.gateway import routes, simclock

    m, base, full_pct = _settings(args)
    if args.full_pct is not None:
        full_pct = args.full_pct
    full_pct = _between("--full-pct", planner.FULL_PCT if full_pct is None else full_pct, 0, 100, lo_open=True)
    route_days = planner.Routes.parse(args.route_days, args.route_hour, args.tz)
    _between("--margin-h", args.margin_h, 0, 7 * 24)
    _between("--unknown-fill-pct", args.unknown_fill_pct, 0, 100)
    _between("--stale-h", args.stale_h, 0, 24 * 365, lo_open=True)
    _between("--interval", args.interval, 0, 86400, lo_open=True)
    trucks = matrix = None
    if args.trucks < 0:
        raise ValueError("--trucks must be 0 (no routes) or more, got %d" % args.trucks)
    if args.trucks:
        try:
            import vroom  # noqa: F401
        except ImportError:
            raise ValueError("--trucks needs the routing solver: pip install 'binlink[planner]' (pyvroom)") from None
        trucks = routes.Trucks(args.trucks, args.truck_capacity, routes.parse_latlon(args.depot) if args.depot else None,
                               args.shift_h, args.speed_kmh, args.service_min * 60).check()
        if args.distance_matrix:
            try:
                matrix = routes.load_matrix(args.distance_matrix)
            except OSError as e:
                raise ValueError("--distance-matrix: %s" % e) from None
    if clock is None and args.sim_clock:
        try:
            clock = simclock.SimClock(args.sim_clock)
        except OSError as e:
            raise ValueError("--sim-clock: %s (start the simulator first)" % e) from None
    hist = None
    if args.history:
        from binlink.gateway import history

        try:
            hist = history.History(args.history)
        except Exception as e:  # sqlite3.Error, OSError: said, not a traceback
            raise ValueError("--history %s: %s" % (args.history, e)) from None
    return planner.Planner(m, base, route_days, args.margin_h * 3600, args.interval, clock=clock or time.time, history=hist,
                           unknown_fill_pct=args.unknown_fill_pct, full_pct=full_pct, stale_s=args.stale_h * 3600,
                           trucks=trucks, matrix=matrix)


def cmd_planner(args):
    import signal

    from binlink.gateway import config

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        p = planner_from_args(args)
    except (ValueError, config.ConfigError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    page = None
    if args.http:
        from binlink.gateway import planner_page

        host, _, port = args.http.rpartition(":")
        try:
            page = planner_page.PageServer(p, host or "127.0.0.1", int(port)).start()
        except (ValueError, OSError) as e:
            print("error: --http %s: %s" % (args.http, getattr(e, "strerror", None) or e), file=sys.stderr)
            return 2
        print("planner page: http://%s:%d/" % (host or "127.0.0.1", page.port), flush=True)
    signal.signal(signal.SIGTERM, p.stop)
    signal.signal(signal.SIGINT, p.stop)
    print("planner: %s -> %s, rounds %s at %02d:%02d %s, full = %g %%%s" % (
        "%s/bin/+/state" % p.base, plan_topic(p.base), ",".join(planner.WEEKDAYS[d] for d in p.routes.days), int(p.routes.hour),
        round(p.routes.hour % 1 * 60), p.routes.tz, p.settings["full_pct"],
        ", %d trucks" % p.settings["trucks"].count if p.settings["trucks"] else ""), flush=True)
    try:
        p.run()
    finally:
        if page is not None:
            page.close()
    return 0


def cmd_plan(args):
    from binlink.gateway import config

    try:
        m, base, _ = _settings(args)
    except config.ConfigError as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    got = threading.Event()
    box = []
    c = planner.mqtt_client(m, "binlink-plan-view-%d" % (time.time() * 1000 % 1_000_000))
    c.on_connect = lambda client, *a: client.subscribe(plan_topic(base), qos=1)
    c.on_message = lambda client, userdata, msg: (box.append(msg.payload), got.set())
    try:
        c.connect(m.host, m.port)
    except OSError as e:
        print("error: cannot reach the broker at %s:%d: %s" % (m.host, m.port, e.strerror or e), file=sys.stderr)
        return 2
    c.loop_start()
    ok = got.wait(args.timeout)
    c.loop_stop()
    c.disconnect()
    if not ok:
        print("no collection list at %s (is `binlink planner` running?)" % plan_topic(base), file=sys.stderr)
        return 1
    body = json.loads(box[0])
    if args.csv:
        write_csv(args.csv, body)
    if args.geojson:
        write_geojson(args.geojson, body)
    print(json.dumps(body, indent=1, sort_keys=True) if args.json else format_plan(body))
    return 0


def _f(v, fmt="%.1f"):
    return "-" if v is None else fmt % v


def _local(text, tz, fmt="%a %d %b %H:%M"):
    """An ISO time of the message in the site's time zone (UTC when the message names none)."""
    if not text:
        return "-"
    from datetime import datetime, timezone

    return datetime.fromtimestamp(planner.parse_iso(text), planner.zone(tz) if tz else timezone.utc).strftime(fmt)


def format_plan(body, now=None):
    tz = body.get("tz")
    lines = ["next round %s, bins due before %s: %d of %d (full = %s %%)" % (
        body.get("next_round_local") or body["next_round"], _local(body["horizon"], tz, "%a %d %b %H:%M %Z"), len(body["bins"]),
        body["bins_known"], _f(body.get("full_pct"), "%g")),
        "%-3s %-12s %-24s %6s %6s %-16s %7s  %s" % ("#", "bin", "name", "fill%", "age h", "full at", "%/day", "why")]
    for i, b in enumerate(body["bins"], 1):
        lines.append("%-3d %-12s %-24s %6s %6s %-16s %7s  %s" % (
            i, b["bin_id"], (b.get("name") or "-")[:24], _f(b["fill_pct"]), _f(b.get("age_h")), _local(b["full_at"], tz),
            _f(b["fill_rate_pct_per_day"]), b.get("why") or b["reason"]))
    quiet = body.get("quiet") or []
    if quiet:
        lines.append("quiet sensors (not trusted, not listed): %d" % len(quiet))
        for b in quiet:
            lines.append("    %-12s %-24s last %6s %%  %s" % (b["bin_id"], (b.get("name") or "-")[:24], _f(b["fill_pct"]), b["why"]))
    hot = body.get("hot_spots") or []
    if hot:
        lines.append("overflow hot spots (28 days): " + ", ".join("%s %s (%d overflows, %.0f h)" % (
            h["bin_id"], h.get("name") or "", h["overflows"], h["overflow_h"]) for h in hot))
    if body.get("routes_error"):
        lines.append("no routes: %s" % body["routes_error"])
    r = body.get("routes")
    if r:
        lines.append("routes: %d of %d trucks, %.1f km (list order: %.1f km), depot %s" % (
            len(r["trucks"]), r.get("trucks_available", len(r["trucks"])), r["km"], r.get("list_order_km") or 0,
            "%.5f,%.5f" % tuple(r["depot"]) if r.get("depot") else "-"))
        for t in r["trucks"]:
            lines.append("  truck %d: %d bins, %.1f km, %.1f h, load %.1f bins (%.0f %% of capacity)" % (
                t["truck"], len(t["stops"]), t["km"], t["hours"], t["load_bins"], t["load_pct"]))
            lines.append("    " + " -> ".join(["depot"] + ["%s (%s)" % (s["bin_id"], _local(s["arrive"], tz, "%H:%M")) for s in t["stops"]]
                                            + ["depot"]))
        if r["unrouted"]:
            lines.append("  not routed (capacity, hours or no position): %s" % ", ".join(r["unrouted"]))
    return "\n".join(lines)


CSV_FIELDS = ("truck", "stop", "bin_id", "name", "lat", "lon", "fill_pct", "arrive", "load_bins")


def csv_rows(body):
    r = body.get("routes") or {"trucks": [], "unrouted": []}
    for t in r["trucks"]:
        for k, s in enumerate(t["stops"], 1):
            yield {"truck": t["truck"], "stop": k, "bin_id": s["bin_id"], "name": s.get("name") or "", "lat": s.get("lat"),
                   "lon": s.get("lon"), "fill_pct": s.get("fill_pct"), "arrive": s["arrive"], "load_bins": s["load"]}
    by_id = {b["bin_id"]: b for b in body["bins"]}
    for bin_id in r["unrouted"]:
        b = by_id.get(bin_id, {})
        yield {"truck": "", "stop": "", "bin_id": bin_id, "name": b.get("name") or "", "lat": b.get("lat"), "lon": b.get("lon"),
               "fill_pct": b.get("fill_pct"), "arrive": "", "load_bins": ""}


def write_csv(path, body):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        w.writerows(csv_rows(body))


def geojson(body):
    """Points for every listed and quiet bin (with fill, reason, truck and stop), a line per truck
    (depot -> stops -> depot). Coordinates are [lon, lat] as RFC 7946 says."""
    stop_of = {}
    feats = []
    r = body.get("routes") or {}
    for t in r.get("trucks", []):
        line = [r["depot"]] + [[s["lat"], s["lon"]] for s in t["stops"] if s.get("lat") is not None] + [r["depot"]]
        feats.append({"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[p[1], p[0]] for p in line]},
                      "properties": {"truck": t["truck"], "km": t["km"], "hours": t["hours"], "load_pct": t["load_pct"],
                                     "bins": len(t["stops"])}})
        for k, s in enumerate(t["stops"], 1):
            stop_of[s["bin_id"]] = (t["truck"], k, s["arrive"])
    for b in body["bins"] + (body.get("quiet") or []):
        if b.get("lat") is None:
            continue
        truck, stop, arrive = stop_of.get(b["bin_id"], (None, None, None))
        feats.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [b["lon"], b["lat"]]},
                      "properties": {"bin_id": b["bin_id"], "name": b.get("name"), "fill_pct": b["fill_pct"], "full_at": b["full_at"],
                                     "reason": b["reason"], "why": b.get("why"), "age_h": b.get("age_h"), "truck": truck,
                                     "stop": stop, "arrive": arrive}})
    if r.get("depot"):
        feats.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [r["depot"][1], r["depot"][0]]},
                      "properties": {"depot": True}})
    return {"type": "FeatureCollection", "features": feats}


def write_geojson(path, body):
    with open(path, "w") as f:
        json.dump(geojson(body), f, indent=1)


def cmd_report(args):
    import os

    from binlink.gateway import history
    from binlink.sim import report

    if not os.path.exists(args.history):
        print("error: no history at %s (start `binlink planner --history %s`)" % (args.history, args.history), file=sys.stderr)
        return 2
    h = history.History(args.history)
    try:
        site = report.site_figures(h, args.days, args.full_pct, args.stale_h * 3600, args.chart_bins)
    finally:
        h.close()
    if site is None:
        print("error: %s holds no readings" % args.history, file=sys.stderr)
        return 1
    report.write_site(args.out, site)
    print(json.dumps({k: v for k, v in site.items() if k not in ("series", "hot_spots", "quiet", "bins_info")}, sort_keys=True))
    print("report: %s" % args.out)
    return 0
