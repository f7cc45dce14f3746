"""Closing the loop: trucks driven by the published collection list, against fixed weekly rounds.

Over a simulated month every bin runs its real firmware (CPython) against the honest physics; its
frames are verified, decoded and calibrated with the gateway's own code, and each bin's forecast is
learned exactly as the gateway learns it. On each route day the trucks go out:

- fixed: each bin on its weekly pattern (1, 2, 3 or 6 rounds a week), chosen as a waste authority
  would from the bin's average fill time: the sparsest pattern whose longest gap is under it;
- forecast: the bins on the planner's list (`gateway/planner.py`, the same function the
  `binlink planner` service publishes with).

A round visits its bins one after another over TRUCK_SPREAD_S (a listed round in `dispatch_order`). Both policies see the same bins, the same waste and the
same seeds. Measured: collections per bin-month, overflow bin-hours (a bin's true mean level at or
above full), and the forecast's error 24 h before each true full time."""
import heapq
import math
import random

from binlink.gateway import calibration, events, forecast, planner, registry
from binlink.gateway.config import Events
from binlink.gateway.history import History
from binlink.sim.fleet import Fleet
from binlink.wire import codec

DAY = 86400.0
ROUTES = planner.Routes((0, 1, 2, 3, 4, 5), 7.0)  # Monday to Saturday, trucks leave at 07:00
FIXED_PATTERNS = ((0,), (0, 3), (0, 2, 4), (0, 1, 2, 3, 4, 5))  # 1, 2, 3 and 6 rounds a week
TRUCK_SPREAD_S = 6 * 3600.0
MARGIN_H = planner.MARGIN_S / 3600  # the planner service's default
START = 1_790_000_000.0 // (7 * DAY) * (7 * DAY) + 4 * DAY  # a Monday, 00:00 UTC
FORECAST_LEAD_S = 24 * 3600.0
WARMUP_S = 3 * DAY
# reactive: no rounds, a truck comes 1-6 h after a bin reports 100 %, the brim (how the forecast is scored:
# every bin then reaches full many times a month, on every day of the week)
POLICIES = ("fixed", "forecast", "reactive")
# the forecast is scored on the fleet's first SCORED_BINS bins (the same bins whatever the fleet's
# size: a fleet draws its bins in order): ~2,300 fill cycles a month, enough for the mean error,
# and a city-sized report does not pay a third full run for it
SCORED_BINS = 300


def max_gap_days(pattern):
    days = sorted(pattern)
    return max((days[(i + 1) % len(days)] - d) % 7 or 7 for i, d in enumerate(days))


def fixed_pattern(days_to_fill, safety=0.8):
    """The sparsest weekly pattern whose longest gap stays under safety x the mean time to fill."""
    for p in FIXED_PATTERNS:
        if max_gap_days(p) <= safety * days_to_fill:
            return p
    return FIXED_PATTERNS[-1]


class Tracked:
    """One bin as the back office sees it: its registry entry, state and forecast."""

    def __init__(self, dev, device, keep_series, scored=False, history=None, rng=None):
        self.dev = dev
        self.rng = rng  # this bin's own randomness: its first wake, which of its frames the air loses
        self.scored = scored  # keep predictions at 100 % for _forecast_errors
        self.history = history  # gateway.history.History: what a real site's planner would keep
        self.device = device
        self.last_fcnt = None
        self.rejected = 0
        self.forecast = forecast.BinForecast()
        self.state = {"bin_id": device.bin_id, "name": device.name, "lat": device.lat, "lon": device.lon,
                      "fill_pct": None, "full_at": None, "fill_rate_pct_per_day": None}
        self.prev_fill = None
        self.collections = []  # true pickup times
        self.predictions = []  # (measured at, full_at or None)
        self.series = {"truth": [], "published": [], "forecast": [], "pickups": [], "emptied": []} if keep_series else None


def simulate(policy, bins=300, days=30, seed=1, margin_h=MARGIN_H, loss=0.03, keep_series=4, warmup_days=7, t0=START, trucks=None,
             processes=1, safety=0.8):
    """Runs one policy over `days` after `warmup_days` on fixed rounds (the forecasts learn, as
    they would have on a fleet already in service); returns its figures for those days, and
    per-bin series for the first keep_series bins. trucks (routes.Trucks): each counted listed
    round is routed, and its length compared with visiting the same bins in list order.

    Every published state goes into a planner history (gateway/history.py), and the site's figures
    (hot spots, quiet sensors, collections seen) come from it by the code `binlink report` runs on a
    real site's history: the same report from either.

    The fleet is run as districts of up to DISTRICT_BINS bins, each with its own truck going
    round its listed bins (`districts`); processes > 1 runs them that many at a time, with the
    same figures as one after the other. safety: the fixed patterns' (fixed_pattern; 0: every
    bin on every round)."""
    if policy not in POLICIES:
        raise ValueError("policy must be one of %s, got %r" % (", ".join(POLICIES), policy))
    runs = _runs(policy, bins, days, seed, margin_h, loss, keep_series, warmup_days, t0, safety)
    return _merge(_in_processes([(_district, args) for args in runs], processes), trucks)


DISTRICT_BINS = 250


def _runs(policy, bins, *args):
    """_district's arguments for each of the policy's districts (args: days to safety)."""
    return [(policy, bins) + args + (members,) for members in districts(bins, policy)]


def districts(bins, policy="forecast"):
    """The fleet's bins as districts (index ranges), each run on its own. A fixed round reads no
    measurement, so the fixed policy is one district whatever the fleet's size (see _district)."""
    if policy == "fixed":
        return [range(bins)]
    n = max(1, math.ceil(bins / DISTRICT_BINS))
    return [range(bins * k // n, bins * (k + 1) // n) for k in range(n)]


def _district(policy, bins, days, seed, margin_h, loss, keep_series, warmup_days, t0, safety, members):
    """One district's bins under `policy`: the raw results _merge adds up.

    Each bin's randomness (when it first wakes, which frames the air loses) is its own, and each
    district's truck its own, so a bin fares the same whichever district holds it and whatever
    runs beside it. Under the fixed policy only the charted bins (keep_series) run their firmware:
    a fixed round reads no measurement, and the physics is the same however often it is looked at
    (physics.Bin.advance)."""
    hist = History(":memory:") if policy == "forecast" else None
    fleet = Fleet(bins, seed=seed, t0=t0, wake_s=3600, report_s=3600, alarm_rate_per_week=0.0)
    rng = random.Random((seed * 31 + 5) * 1009 + members.start)  # this district's truck
    rules = Events()
    tracked = []
    for i in members:
        d = fleet.devices[i]
        d.bin.on_schedule = False
        d.bin.next_collection = math.inf
        lat, lon = fleet.latlon(d)
        device = registry.Device(d.device_id, d.bin_id, d.key, d.bin.nominal_depth_mm, d.bin.full_mm,
                                 "Simulated bin %s" % d.bin_id[4:], lat, lon)
        tr = Tracked(d, device, i < keep_series, scored=policy == "reactive", history=hist,
                     rng=random.Random(seed * 1_000_003 + i))
        d._transmit = _receiver(tr, tr.rng, loss, rules)
        tracked.append(tr)
    patterns = [fixed_pattern(tr.dev.bin.days_to_fill, safety) for tr in tracked]
    start = t0 + warmup_days * DAY  # what is counted starts here
    end = start + days * DAY
    wakes = [(t0 + tr.rng.uniform(0, 3600), k) for k, tr in enumerate(tracked) if policy != "fixed" or tr.series is not None]
    heapq.heapify(wakes)
    rounds = ROUTES.next_after(t0)
    collections = 0
    listed_rounds = []  # the counted rounds' lists, for the routes (over the whole fleet: _merge)
    overflow_before = None
    while True:
        t = wakes[0][0] if wakes else end
        if overflow_before is None and t >= start and rounds >= start:  # after the learning week's last round
            for tr in tracked:  # the physics is continuous: bring every bin to the start and note its overflow
                tr.collections += [c for c, _ in tr.dev.bin.advance(start)]
            overflow_before = sum(tr.dev.bin.overflow_s for tr in tracked)
        if rounds <= t and rounds < end and policy != "reactive":
            fleet.now = rounds
            for tr in tracked:  # what the last round planned is done before this one plans
                tr.collections += [c for c, _ in tr.dev.bin.advance(rounds)]
            counted = rounds >= start
            chosen, listed = _round(policy if counted else "fixed", rounds, tracked, patterns, rng, margin_h, rules.full_pct)
            collections += chosen if counted else 0
            if counted and listed:
                listed_rounds.append((rounds, listed))
            rounds = ROUTES.next_after(rounds)
            continue
        if not wakes:
            break
        _, k = heapq.heappop(wakes)
        if t >= end:
            continue
        fleet.now = t
        tr = tracked[k]
        tr.collections += [c for c, _ in tr.dev.bin.advance(t)]
        heapq.heappush(wakes, (t + tr.dev.wake(), k))
        if policy == "reactive" and (tr.prev_fill or 0) >= 100.0 and tr.dev.bin.next_collection == math.inf:
            tr.dev.bin.collect_at(t + tr.rng.uniform(3600, 6 * 3600))
            collections += t >= start
    for tr in tracked:
        tr.collections += [c for c, _ in tr.dev.bin.advance(end)]
        if tr.series is not None:
            tr.series["pickups"] = list(tr.collections)
    fleet.close()
    errors, unpredicted = _forecast_errors(tracked, t0)
    return {
        "policy": policy, "bins": bins, "days": days, "t0": t0, "start": start, "end": end,
        "collections": collections,
        "overflow_s": sum(tr.dev.bin.overflow_s for tr in tracked) - (overflow_before or 0.0),
        "forecast_errors_h": errors, "forecast_unpredicted": unpredicted,
        "series": {tr.device.bin_id: dict(tr.series, name=tr.device.name) for tr in tracked if tr.series is not None},
        "history": hist.take() if hist is not None else None,
        "listed_rounds": listed_rounds,
    }


def _merge(parts, trucks=None):
    """One policy's districts (_district results) as one fleet's figures. The routes are solved
    over the whole fleet's list of each round, as the planner publishes it."""
    first = parts[0]
    bins, days, end = first["bins"], first["days"], first["end"]
    collections = sum(p["collections"] for p in parts)
    route_km = [0.0, 0.0]  # solver, list order
    if trucks is not None:
        from binlink.gateway import routes

        by_round = {}
        for p in parts:
            for t, listed in p["listed_rounds"]:
                by_round.setdefault(t, []).extend(listed)
        for t in sorted(by_round):
            route_km[0] += routes.solve(by_round[t], trucks)["km"]
            route_km[1] += routes.list_order_km(by_round[t], trucks)
    site = None
    if first["history"] is not None:
        from binlink.sim import report

        hist, rules = History(":memory:"), Events()
        for p in parts:
            hist.put(p["history"])
        hist.flush(end)
        site = report.site_figures(hist, days, rules.full_pct, chart_bins=0, emptied_drop_pct=rules.emptied_drop_pct)
        hist.close()
    series = {}
    for p in parts:
        series.update(p["series"])
    return {
        "policy": first["policy"], "bins": bins, "days": days,
        "collections": collections,
        "collections_per_bin_month": round(collections / bins * 30.0 / days, 2),
        "overflow_bin_hours": round(sum(p["overflow_s"] for p in parts) / 3600.0, 1),
        "forecast_errors_h": [e for p in parts for e in p["forecast_errors_h"]],
        "forecast_unpredicted": sum(p["forecast_unpredicted"] for p in parts),
        "series": series,
        "t0": first["t0"], "start": first["start"], "end": end, "site": site,
        "route_km": round(route_km[0], 1), "route_km_list_order": round(route_km[1], 1),
    }


def _receiver(tr, rng, loss, rules):
    """The gateway's half for one bin: verify, decode, calibrate, learn the forecast."""

    def receive(dev, payload, on_air_len):
        now = dev.clock()
        for frame in dev.frames_in(payload):
            if rng.random() < loss:
                continue  # lost on air: the forecast must live with missing readings
            try:
                tr.last_fcnt = codec.verify(frame, dev.key, tr.last_fcnt)
            except codec.ProtocolError:  # a frame sent twice (module retry): the gateway drops it too
                tr.rejected += 1
                continue
            for _, age_min, distance, _, _, flags, _, _ in codec.readings(frame, tr.last_fcnt):  # none in a hello
                _reading(tr, calibration.fill_pct(tr.device, distance, flags), now - 60 * age_min, rules)
        return True

    return receive


def _reading(tr, fill, t, rules):
    tr.forecast.update(t, fill, rules.emptied_drop_pct)
    full_at = tr.forecast.full_at(rules.full_pct)  # what the gateway publishes: when it reaches the site's full
    # the state as the gateway publishes it after every reading, a faulty one too (fill null: an
    # overfull bin often reads nothing, its forecast stays): the bin is heard, not quiet
    tr.state = planner.merge_state(tr.state, dict(tr.state, fill_pct=fill, full_at=None if full_at is None else planner.iso(full_at),
                                                  fill_rate_pct_per_day=tr.forecast.rate_pct_per_day(), measured_at=planner.iso(t)))
    if tr.history is not None:
        tr.history.add(tr.state)
    if tr.scored:  # the forecast's accuracy is scored against the true time the bin is full to the brim
        tr.predictions.append((t, tr.forecast.full_at(100.0)))
    s = tr.series
    if s is not None:
        s["truth"].append((t, tr.dev.bin.true_fill_pct() if tr.dev.bin.level <= 1 else 100.0 * tr.dev.bin.level))
        if fill is not None:
            s["published"].append((t, fill))
        s["forecast"].append((t, full_at))  # to the site's full (the report draws it so)
        if "emptied" in events.detect(tr.prev_fill, None, fill, 0, rules):
            s["emptied"].append(t)
    if fill is not None:
        tr.prev_fill = fill


def dispatch_order(listed, round_end):
    """The order a truck empties the listed bins: those that would be full before the round ends
    first, earliest first; then the rest latest-due first: emptying a bin later in the round puts
    off the moment it is full again (before the next round, for the fastest ones)."""
    def due(b):
        return planner.parse_iso(b["full_at"]) if b["reason"] == "forecast" else 0.0

    now = [b for b in listed if due(b) <= round_end]
    later = [b for b in listed if due(b) > round_end]
    return sorted(now, key=due) + sorted(later, key=due, reverse=True)


def _round(policy, t, tracked, patterns, rng, margin_h, full_pct=100.0):
    """One round of the trucks at t; returns how many bins it empties, and the list it went by
    (None for a fixed round). A round visits its bins one after another over TRUCK_SPREAD_S: a
    fixed round in its route's order (unrelated to how full the bins are), a listed round in
    `dispatch_order`."""
    listed = None
    if policy == "fixed":
        weekday = int(t // DAY + 3) % 7
        chosen = [tr for tr, p in zip(tracked, patterns) if weekday in p]
        rng.shuffle(chosen)
    else:
        by_id = {tr.device.bin_id: tr for tr in tracked}
        # the list as published just before the trucks leave: this round, bins due before the next one
        listed = planner.plan_message({tr.device.bin_id: tr.state for tr in tracked}, t - 1.0, ROUTES, margin_h * 3600.0,
                                      full_pct=full_pct)["bins"]
        chosen = [by_id[b["bin_id"]] for b in dispatch_order(listed, t + TRUCK_SPREAD_S)]
    for k, tr in enumerate(chosen):
        tr.dev.bin.collect_at(t + TRUCK_SPREAD_S * (k + rng.random()) / len(chosen))
    return len(chosen), listed


def _forecast_errors(tracked, t0):
    """|full_at - true full time| (hours) of the forecast current 24 h before each true full time
    (same fill cycle: no pickup in between); and how many of those had no forecast."""
    errors, unpredicted = [], 0
    for tr in tracked:
        preds = tr.predictions
        for full_time in tr.dev.bin.full_times:
            lead = full_time - FORECAST_LEAD_S
            if lead < t0 + WARMUP_S:
                continue
            before = [p for p in preds if p[0] <= lead]
            if not before or lead - before[-1][0] > 3 * 3600:
                continue
            t_pred, full_at = before[-1]
            if any(t_pred < c <= full_time for c in tr.collections):
                continue
            if full_at is None:
                unpredicted += 1
            else:
                errors.append(abs(full_at - full_time) / 3600.0)
    return errors, unpredicted


def compare(bins=300, days=30, seed=1, margin_h=MARGIN_H, keep_series=4, processes=1, trucks=None):
    """Both policies over the same month, and the forecast scored where every bin fills up (the
    reactive run: under the two policies most bins are emptied before they are full, and the few
    that fill are the weekend's fastest, a biased sample). The figures the bench and the report use.

    processes > 1: the runs' districts (independent, each seeded alike) in that many worker
    processes at once; the figures are the same as one after the other."""
    tasks = []
    for policy, n in (("fixed", bins), ("forecast", bins), ("reactive", min(bins, SCORED_BINS))):
        tasks += _runs(policy, n, days, seed, margin_h, 0.03, keep_series if policy != "reactive" else 0, 7, START, 0.8)
    # fixed rounds as often as they go (every bin on every round: physics only): the service no
    # fixed schedule can beat, set against the list's
    every = _runs("fixed", bins, days, seed, margin_h, 0.03, 0, 7, START, 0.0)
    calls = [(_district, args) for args in tasks + every] + [(bound, (bins, days, seed, margin_h))]
    done = _in_processes(calls, processes)
    fixed, fc, scored = (_merge([r for task, r in zip(tasks, done) if task[0] == policy], trucks if policy == "forecast" else None)
                         for policy in POLICIES)
    every = _merge(done[len(tasks):-1])
    errors = scored["forecast_errors_h"]
    return {
        "fixed": fixed, "forecast": fc, "full_pct": Events().full_pct,
        "collections_saved_pct": round(100.0 * (1 - fc["collections"] / fixed["collections"]), 1) if fixed["collections"] else None,
        "collections_saved_bound_pct": done[-1],
        "margin_h": margin_h,
        "overflow_bin_hours_fixed": fixed["overflow_bin_hours"],
        "overflow_bin_hours_forecast": fc["overflow_bin_hours"],
        "collections_per_bin_month_fixed_every_round": every["collections_per_bin_month"],
        "overflow_bin_hours_fixed_every_round": every["overflow_bin_hours"],
        "forecast_full_at_mae_h": round(sum(errors) / len(errors), 2) if errors else None,
        "forecast_scored": len(errors),
        "forecast_unpredicted": scored["forecast_unpredicted"],
        "route_km_saved_pct": round(100.0 * (1 - fc["route_km"] / fc["route_km_list_order"]), 1) if fc["route_km_list_order"] else None,
    }


def bound(bins=300, days=30, seed=1, margin_h=MARGIN_H, warmup_days=7, t0=START, full_pct=None):
    """The most a collection list can save on these rounds: the same bins, rounds and truck spread
    as `compare`, with the forecast replaced by the truth, each bin's own mean filling speed from
    the physics (no sensor, no firmware: nothing is measured), so a bin is listed exactly when it
    would reach full before the round after next + margin_h. What the forecast policy falls short
    of this is what measuring and forecasting cost; what this falls short of 100 % is the grain of
    the rounds (daily, none on Sundays) and the margin."""
    full = (Events().full_pct if full_pct is None else full_pct) / 100.0
    start = t0 + warmup_days * DAY
    end = start + days * DAY
    counts = {}
    for policy in ("fixed", "truth"):  # the same bins, afresh for each
        fleet = Fleet(bins, seed=seed, t0=t0, wake_s=3600, report_s=3600, alarm_rate_per_week=0.0)
        fleet.close()
        rng = random.Random(seed * 31 + 5)
        field = [d.bin for d in fleet.devices]
        for b in field:
            b.on_schedule = False
            b.next_collection = math.inf
        patterns = [fixed_pattern(b.days_to_fill) for b in field]
        collections, t = 0, ROUTES.next_after(t0)
        while t < end:
            for b in field:
                b.advance(t)
            horizon = ROUTES.next_after(t) + margin_h * 3600.0
            weekday = int(t // DAY + 3) % 7
            if policy == "fixed" or t < start:
                chosen = [b for b, p in zip(field, patterns) if weekday in p]
            else:
                chosen = [b for b in field if _true_level_at(b, t, horizon) >= full]
            for b in chosen:
                b.collect_at(t + TRUCK_SPREAD_S * rng.random())
            collections += len(chosen) if t >= start else 0
            t = ROUTES.next_after(t)
        counts[policy] = collections
    return round(100.0 * (1 - counts["truth"] / counts["fixed"]), 1) if counts["fixed"] else None


def _true_level_at(b, t, until):
    """The bin's level at `until` from its level at t at its mean filling speed (no noise)."""
    level = b.level
    while t < until:
        step = min(600.0, until - t)
        level += b.rate_per_s(t) * step
        t += step
    return level


def _in_processes(calls, processes):
    """fn(*args) for each (fn, args) of calls, `processes` at a time, results in order. The calls
    are handed out longest first (a district's length is its bins' count; the rest are short), so
    no worker is left with a long one at the end. Fresh interpreters (spawn): forking a caller that
    runs threads (pytest's, a CLI's) can deadlock."""
    if processes <= 1 or len(calls) == 1:
        return [fn(*args) for fn, args in calls]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    def work(k):  # a firmware district's bins (fixed districts and the rest run physics only)
        fn, args = calls[k]
        return len(args[-1]) if fn is _district and args[0] != "fixed" else 0

    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {k: pool.submit(calls[k][0], *calls[k][1]) for k in sorted(range(len(calls)), key=work, reverse=True)}
        return [futures[k].result() for k in range(len(calls))]
