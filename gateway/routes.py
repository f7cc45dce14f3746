"""Routes for a round: the listed bins in visiting order for the site's trucks.

A capacitated vehicle-routing problem with a time limit per truck: every truck leaves the depot
when the round starts and must be back within the working hours; it carries at most `capacity`
full bins' worth (a bin at 60 % loads 0.6); each stop costs `service_s`. Distances are
straight-line (haversine) between the registry's positions, or the site's own distance matrix
(a CSV file: a header row of ids, then one row per id, metres; the depot is the id "depot").
Travel time is distance over `speed_kmh`.

Solved by VROOM (pyvroom), chosen over OR-Tools routing after measuring both on the same
instances (docs/planner.md: VROOM found routes as short or shorter in a fraction of the time).
Bins the trucks cannot take (capacity, hours) are returned as `unrouted`, never silently dropped.
Bins without a position cannot be routed either and are named as such."""
import csv
import math
from dataclasses import dataclass

EARTH_M = 6371008.8
FULL = 100  # a full bin's load, in the solver's integer units (fill %)


@dataclass
class Trucks:
    count: int = 2
    capacity_bins: float = 40.0  # full bins' worth one truck carries
    depot: tuple = None  # (lat, lon); None: the centre of the bins' positions
    shift_h: float = 8.0
    speed_kmh: float = 25.0
    service_s: float = 120.0

    def check(self):
        """ValueError naming the setting that cannot be right."""
        if not 1 <= self.count <= 500:
            raise ValueError("trucks: count must be 1..500, got %r" % self.count)
        if not 0 < self.capacity_bins <= 10000:
            raise ValueError("trucks: capacity must be above 0 and at most 10000 bins, got %r" % self.capacity_bins)
        if not 0 < self.shift_h <= 24:
            raise ValueError("trucks: working hours must be above 0 and at most 24, got %r" % self.shift_h)
        if not 0 < self.speed_kmh <= 200:
            raise ValueError("trucks: speed must be above 0 and at most 200 km/h, got %r" % self.speed_kmh)
        if not 0 <= self.service_s <= 3600:
            raise ValueError("trucks: service time must be 0..3600 s, got %r" % self.service_s)
        if self.depot is not None:
            lat, lon = self.depot
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                raise ValueError("trucks: depot must be lat,lon in degrees, got %r" % (self.depot,))
        return self


def parse_latlon(text):
    try:
        lat, lon = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError("expected LAT,LON in degrees, got %r" % text) from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise ValueError("expected LAT,LON in degrees, got %r" % text)
    return lat, lon


def haversine_m(a, b):
    lat1, lon1, lat2, lon2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_M * math.asin(min(1.0, math.sqrt(h)))


def haversine_matrix(points):
    """Metres (int) between every pair of (lat, lon)."""
    n = len(points)
    m = [[0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            m[i][j] = m[j][i] = int(round(haversine_m(points[i], points[j])))
    return m


def load_matrix(path):
    """{(id, id): metres} from a CSV distance matrix: header `,id1,id2,...`, rows `id,d11,d12,...`."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or len(rows[0]) < 2:
        raise ValueError("%s: expected a header row of ids" % path)
    ids = [c.strip() for c in rows[0][1:]]
    out = {}
    for n, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != len(ids) + 1:
            raise ValueError("%s line %d: %d values, expected %d" % (path, n, len(row) - 1, len(ids)))
        for j, v in enumerate(row[1:]):
            try:
                d = float(v)
            except ValueError:
                raise ValueError("%s line %d: %r is not a distance in metres" % (path, n, v)) from None
            if not d >= 0 or d == math.inf:
                raise ValueError("%s line %d: %r is not a distance in metres" % (path, n, v))
            out[(row[0].strip(), ids[j])] = int(round(d))
    return out


def _load(b):
    """A bin's load in FULL units: its fill (at least a little: an empty bin still takes a stop)."""
    fill = b.get("fill_pct")
    return int(min(150, max(1, round(fill if fill is not None else FULL))))


def problem(bins, trucks, matrix=None):
    """(ids, points, metres, loads) with the depot at index 0; bins without a position (and absent
    from `matrix`) returned apart."""
    ids, points, loads, unplaced = ["depot"], [None], [0], []
    for b in bins:
        has_pos = b.get("lat") is not None and b.get("lon") is not None
        if has_pos or (matrix is not None and (b["bin_id"], "depot") in matrix):
            ids.append(b["bin_id"])
            points.append((b["lat"], b["lon"]) if has_pos else None)
            loads.append(_load(b))
        else:
            unplaced.append(b["bin_id"])
    placed = [p for p in points[1:] if p is not None]
    depot = trucks.depot
    if depot is None and placed:
        depot = (sum(p[0] for p in placed) / len(placed), sum(p[1] for p in placed) / len(placed))
    points[0] = depot
    if matrix is not None:
        try:
            metres = [[matrix[(a, b)] for b in ids] for a in ids]
        except KeyError as e:
            raise ValueError("distance matrix has no entry for %s -> %s" % e.args[0]) from None
    else:
        metres = haversine_matrix(points)
    return ids, points, metres, loads, unplaced


def _seconds(metres, trucks):
    mps = trucks.speed_kmh / 3.6
    return [[int(round(d / mps)) for d in row] for row in metres]


def exploration_for(n):
    """VROOM's search effort by size (docs/planner.md: level 5 is a second at 50 bins; at 300
    bins level 1 is within 2 % of level 5 in a third of its time)."""
    return 5 if n <= 80 else 2 if n <= 200 else 1


def solve(bins, trucks, matrix=None, exploration=None):
    """Routes for `bins` (the planner's list entries: bin_id, fill_pct, lat, lon). Returns
    {"trucks": [{"truck", "stops": [{"bin_id", "arrive_s", "load"}], "km", "hours", "load_bins",
    "load_pct"}], "unrouted": [bin ids], "km": total}. arrive_s is seconds after the round starts."""
    import vroom

    trucks.check()
    ids, points, metres, loads, unplaced = problem(bins, trucks, matrix)
    out = {"trucks": [], "unrouted": list(unplaced), "km": 0.0}
    if len(ids) == 1:
        return out
    secs = _seconds(metres, trucks)
    cap = int(round(trucks.capacity_bins * FULL))
    p = vroom.Input()
    p.set_durations_matrix("car", secs)
    p.set_costs_matrix("car", metres)  # shortest, not quickest: the same with one speed
    horizon = int(trucks.shift_h * 3600)
    p.add_vehicle([vroom.Vehicle(k + 1, start=0, end=0, capacity=[cap], time_window=vroom.TimeWindow(0, horizon))
                   for k in range(trucks.count)])
    p.add_job([vroom.Job(i, location=i, pickup=[loads[i]], default_service=int(trucks.service_s))
               for i in range(1, len(ids))])
    level = exploration_for(len(ids) - 1) if exploration is None else exploration
    sol = p.solve(exploration_level=level, nb_threads=1)
    stops = {}
    for row in sol.routes.itertuples():
        if row.type == "job":
            stops.setdefault(int(row.vehicle_id), []).append((int(row.id), int(row.arrival)))
    for k in range(1, trucks.count + 1):
        seq = stops.get(k)
        if not seq:
            continue
        out["trucks"].append(_truck(k, seq, ids, metres, secs, loads, trucks, cap))
    routed = {i for seq in stops.values() for i, _ in seq}
    out["unrouted"] += [ids[i] for i in range(1, len(ids)) if i not in routed]
    out["km"] = round(sum(t["km"] for t in out["trucks"]), 2)
    return out


def _truck(k, seq, ids, metres, secs, loads, trucks, cap):
    path = [0] + [i for i, _ in seq] + [0]
    m = sum(metres[a][b] for a, b in zip(path, path[1:]))
    s = sum(secs[a][b] for a, b in zip(path, path[1:])) + trucks.service_s * len(seq)
    load = sum(loads[i] for i, _ in seq)
    return {"truck": k, "stops": [{"bin_id": ids[i], "arrive_s": at, "load": round(loads[i] / FULL, 2)} for i, at in seq],
            "km": round(m / 1000.0, 2), "hours": round(s / 3600.0, 2), "load_bins": round(load / FULL, 2),
            "load_pct": round(100.0 * load / cap, 1)}


def list_order_km(bins, trucks, matrix=None):
    """What visiting the same bins in list order costs: trucks filled one after another in the
    list's order, each back to the depot when full or out of hours. The baseline the solver is
    measured against (route_km_saved_pct)."""
    ids, points, metres, loads, _ = problem(bins, trucks, matrix)
    secs = _seconds(metres, trucks)
    cap, horizon = trucks.capacity_bins * FULL, trucks.shift_h * 3600
    total, here, load, t = 0, 0, 0, 0.0
    for i in range(1, len(ids)):
        back = secs[i][0]
        if load + loads[i] > cap or t + secs[here][i] + trucks.service_s + back > horizon:
            total += metres[here][0]  # this truck is done: a fresh one (or the same, emptied) starts
            here, load, t = 0, 0, 0.0
        total += metres[here][i]
        t += secs[here][i] + trucks.service_s
        load += loads[i]
        here = i
    total += metres[here][0]
    return round(total / 1000.0, 2)


def ortools_solve(bins, trucks, matrix=None, seconds=2.0):
    """The same problem through OR-Tools routing (measured against VROOM; docs/planner.md).
    Returns {"trucks": [[bin ids]], "unrouted": [...], "km": total}."""
    from ortools.constraint_solver import pywrapcp, routing_enums_pb2

    ids, points, metres, loads, unplaced = problem(bins, trucks, matrix)
    secs = _seconds(metres, trucks)
    n = len(ids)
    mgr = pywrapcp.RoutingIndexManager(n, trucks.count, 0)
    r = pywrapcp.RoutingModel(mgr)
    dist = r.RegisterTransitCallback(lambda a, b: metres[mgr.IndexToNode(a)][mgr.IndexToNode(b)])
    r.SetArcCostEvaluatorOfAllVehicles(dist)
    svc = int(trucks.service_s)
    time_cb = r.RegisterTransitCallback(
        lambda a, b: secs[mgr.IndexToNode(a)][mgr.IndexToNode(b)] + (svc if mgr.IndexToNode(a) else 0))
    r.AddDimension(time_cb, 0, int(trucks.shift_h * 3600), True, "time")
    load_cb = r.RegisterUnaryTransitCallback(lambda a: loads[mgr.IndexToNode(a)])
    r.AddDimensionWithVehicleCapacity(load_cb, 0, [int(trucks.capacity_bins * FULL)] * trucks.count, True, "load")
    for node in range(1, n):
        r.AddDisjunction([mgr.NodeToIndex(node)], 10_000_000)
    params = pywrapcp.DefaultRoutingSearchParameters()
    params.first_solution_strategy = routing_enums_pb2.FirstSolutionStrategy.PATH_CHEAPEST_ARC
    params.local_search_metaheuristic = routing_enums_pb2.LocalSearchMetaheuristic.GUIDED_LOCAL_SEARCH
    params.time_limit.FromMilliseconds(int(seconds * 1000))
    sol = r.SolveWithParameters(params)
    routes, routed, total = [], set(), 0
    for v in range(trucks.count):
        i, seq = r.Start(v), []
        while not r.IsEnd(i):
            nxt = sol.Value(r.NextVar(i))
            total += metres[mgr.IndexToNode(i)][mgr.IndexToNode(nxt)]
            if mgr.IndexToNode(i):
                seq.append(ids[mgr.IndexToNode(i)])
                routed.add(mgr.IndexToNode(i))
            i = nxt
        if seq:
            routes.append(seq)
    return {"trucks": routes, "unrouted": unplaced + [ids[i] for i in range(1, n) if i not in routed],
            "km": round(total / 1000.0, 2)}
