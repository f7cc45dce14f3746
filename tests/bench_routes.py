"""Routing solvers measured on the same instances (docs/planner.md): VROOM (pyvroom, the one the
planner uses) against OR-Tools routing, and both against visiting the bins in list order.

    .venv/bin/pip install ortools                 # not a dependency: only this comparison uses it
    .venv/bin/python -m tests.bench_routes        # prints one JSON line per instance
"""
import json
import math
import random
import sys
import time

from binlink.gateway import routes


def instance(n, seed=1, radius_m=4000.0, centre=(52.52, 13.405)):
    rng = random.Random(seed)
    bins = []
    for i in range(n):
        a, r = rng.uniform(0, 2 * math.pi), radius_m * math.sqrt(rng.random())
        lat = centre[0] + r * math.sin(a) / 111320.0
        lon = centre[1] + r * math.cos(a) / (111320.0 * math.cos(math.radians(lat)))
        bins.append({"bin_id": "bin-%04d" % i, "fill_pct": rng.uniform(40, 110), "lat": lat, "lon": lon})
    return bins


def measure(n, trucks, seed=1, ortools_s=(1.0, 5.0)):
    bins = instance(n, seed)
    row = {"bins": n, "trucks": trucks.count, "capacity_bins": trucks.capacity_bins,
           "list_order_km": routes.list_order_km(bins, trucks)}
    t = time.perf_counter()
    v = routes.solve(bins, trucks)
    row["vroom_s"], row["vroom_km"], row["vroom_unrouted"] = round(time.perf_counter() - t, 3), v["km"], len(v["unrouted"])
    try:
        import ortools  # noqa: F401
    except ImportError:
        row["ortools"] = "not installed (pip install ortools)"
        ortools_s = ()
    for limit in ortools_s:
        t = time.perf_counter()
        o = routes.ortools_solve(bins, trucks, seconds=limit)
        row["ortools_%gs_s" % limit] = round(time.perf_counter() - t, 3)
        row["ortools_%gs_km" % limit] = o["km"]
        row["ortools_%gs_unrouted" % limit] = len(o["unrouted"])
    return row


def main():
    cases = [(50, routes.Trucks(2, 40)), (150, routes.Trucks(4, 45)), (300, routes.Trucks(7, 50))]
    for n, trucks in cases:
        print(json.dumps(measure(n, trucks)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
