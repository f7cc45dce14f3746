"""Routes for a round (gateway/routes.py): what a dispatcher relies on. Every listed bin is
visited once or named as not routed; no truck carries more than it holds or works longer than its
hours; the solver's routes are no longer than visiting the bins in list order."""
import math
import random

import pytest
from hypothesis import given, settings, strategies as st

from binlink.gateway import planner, planner_cli, routes

CENTRE = (52.52, 13.405)


def bins_around(n, seed=1, radius_m=3000.0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, r = rng.uniform(0, 2 * math.pi), radius_m * math.sqrt(rng.random())
        lat = CENTRE[0] + r * math.sin(a) / 111320.0
        lon = CENTRE[1] + r * math.cos(a) / (111320.0 * math.cos(math.radians(lat)))
        out.append({"bin_id": "bin-%03d" % i, "name": "Bin %d" % i, "fill_pct": rng.uniform(50, 105), "lat": lat, "lon": lon})
    return out


def visited(r):
    return [s["bin_id"] for t in r["trucks"] for s in t["stops"]]


@pytest.mark.parametrize("n, trucks", [(12, routes.Trucks(1, 40)), (60, routes.Trucks(3, 25)), (120, routes.Trucks(4, 40, shift_h=6))])
def test_every_bin_once_within_capacity_and_hours_and_shorter_than_list_order(n, trucks):
    bins = bins_around(n)
    r = routes.solve(bins, trucks)
    seen = visited(r) + r["unrouted"]
    assert sorted(seen) == sorted(b["bin_id"] for b in bins)  # each once: routed or named
    assert r["unrouted"] == []
    fill = {b["bin_id"]: b["fill_pct"] for b in bins}
    for t in r["trucks"]:
        load = sum(round(fill[s["bin_id"]]) / 100.0 for s in t["stops"])
        assert load <= trucks.capacity_bins + 1e-9 and abs(load - t["load_bins"]) < 0.02
        assert t["hours"] <= trucks.shift_h + 1e-9
        assert [s["arrive_s"] for s in t["stops"]] == sorted(s["arrive_s"] for s in t["stops"])
    assert len(r["trucks"]) <= trucks.count
    baseline = routes.list_order_km(bins, trucks)
    assert r["km"] <= baseline
    if n >= 60:
        assert r["km"] <= 0.8 * baseline  # the bench's goal: 20 % saved


def test_bins_the_trucks_cannot_take_are_named_not_dropped():
    bins = bins_around(30, seed=3)
    r = routes.solve(bins, routes.Trucks(1, capacity_bins=5))  # room for about 6 of them
    assert 3 <= len(visited(r)) <= 10 and len(r["unrouted"]) == 30 - len(visited(r))
    assert r["trucks"][0]["load_bins"] <= 5
    nowhere = [{"bin_id": "no-position", "fill_pct": 95.0, "lat": None, "lon": None}]
    r = routes.solve(bins[:3] + nowhere, routes.Trucks(1, 40))
    assert r["unrouted"] == ["no-position"] and len(visited(r)) == 3


def test_a_distance_matrix_file_replaces_straight_lines(tmp_path):
    """Three bins in a row a-b-c on a map, but the site's matrix says b is only reachable far
    round: the route follows the matrix, and its length is the matrix's."""
    bins = [{"bin_id": k, "fill_pct": 80.0, "lat": 52.5, "lon": 13.40 + 0.01 * i} for i, k in enumerate("abc")]
    ids = ["depot", "a", "b", "c"]
    d = {("depot", "a"): 1000, ("depot", "b"): 9000, ("depot", "c"): 1000, ("a", "b"): 9000, ("a", "c"): 500, ("b", "c"): 9000}
    path = tmp_path / "matrix.csv"
    text = "," + ",".join(ids) + "\n" + "".join(
        x + "," + ",".join(str(0 if x == y else d.get((x, y), d.get((y, x)))) for y in ids) + "\n" for x in ids)
    path.write_text(text)
    matrix = routes.load_matrix(str(path))
    r = routes.solve(bins, routes.Trucks(1, 40, depot=(52.5, 13.41)), matrix)
    assert r["km"] == pytest.approx((1000 + 500 + 9000 + 9000) / 1000.0)  # depot-a-c-b-depot (or reversed)
    order = visited(r)
    assert abs(order.index("a") - order.index("c")) == 1
    with pytest.raises(ValueError, match="no entry"):
        routes.solve(bins + [{"bin_id": "d", "fill_pct": 90.0, "lat": 52.5, "lon": 13.5}], routes.Trucks(1, 40), matrix)
    # in the planner: the list still goes out, saying why it has no routes
    now = planner.parse_iso("2026-11-27T05:00:00Z")
    states = {b["bin_id"]: dict(b, full_at=None, measured_at=planner.iso(now)) for b in bins + [
        {"bin_id": "d", "fill_pct": 95.0, "lat": 52.5, "lon": 13.5}]}
    body = planner.plan_message(states, now, planner.Routes(), 0, trucks=routes.Trucks(1, 40), matrix=matrix)
    assert len(body["bins"]) == 4 and "routes" not in body and body["routes_error"].endswith("no entry for depot -> d")
    assert "no routes: distance matrix" in planner_cli.format_plan(body)


def test_the_plan_carries_the_routes_and_exports_them(tmp_path):
    now = planner.parse_iso("2026-11-27T05:00:00Z")
    states = {b["bin_id"]: dict(b, full_at=None, measured_at=planner.iso(now - 600)) for b in bins_around(20, seed=5)}
    body = planner.plan_message(states, now, planner.Routes(), 0, unknown_fill_pct=0, trucks=routes.Trucks(2, 8))
    r = body["routes"]
    assert sorted(visited(r) + r["unrouted"]) == sorted(b["bin_id"] for b in body["bins"])
    assert all(s["arrive"] >= body["next_round"] for t in r["trucks"] for s in t["stops"])
    text = planner_cli.format_plan(body)
    assert "truck 1:" in text and "depot ->" in text and "% of capacity" in text
    planner_cli.write_csv(str(tmp_path / "r.csv"), body)
    import csv
    import json

    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == len(body["bins"]) and {r_["bin_id"] for r_ in rows} == set(states)
    assert [int(x["stop"]) for x in rows if x["truck"] == "1"] == list(range(1, len(r["trucks"][0]["stops"]) + 1))
    planner_cli.write_geojson(str(tmp_path / "r.geojson"), body)
    g = json.load(open(tmp_path / "r.geojson"))
    lines = [f for f in g["features"] if f["geometry"]["type"] == "LineString"]
    assert len(lines) == len(r["trucks"])
    first = lines[0]["geometry"]["coordinates"]
    assert first[0] == first[-1] == [r["depot"][1], r["depot"][0]]  # [lon, lat], from and back to the depot
    # the same bins listed again: the routes are reused, not solved again
    again = planner.plan_message(states, now, planner.Routes(), 0, unknown_fill_pct=0, trucks=routes.Trucks(2, 8), solved=r)
    assert again["routes"] is r


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_depot_text_is_a_position_or_a_clear_error(text):
    try:
        lat, lon = routes.parse_latlon(text)
    except ValueError as e:
        assert "LAT,LON" in str(e)
    else:
        assert -90 <= lat <= 90 and -180 <= lon <= 180


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"), max_size=8),
                         min_size=0, max_size=5), max_size=5))
def test_any_matrix_file_loads_or_says_which_line_is_wrong(tmp_path_factory, rows):
    import csv

    path = tmp_path_factory.mktemp("m") / "m.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    try:
        m = routes.load_matrix(str(path))
    except ValueError as e:
        assert str(path) in str(e)
    else:
        assert all(isinstance(v, int) and v >= 0 for v in m.values())


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["UTC", "Europe/Berlin", "Nowhere/X", ""]))
def test_any_route_setting_is_accepted_valid_or_refused_clearly(days, hour, tz):
    try:
        r = planner.Routes.parse(days, hour, tz)
    except ValueError as e:
        assert any(w in str(e) for w in ("route days", "route hour", "time zone"))
    else:
        assert 0 <= r.hour < 24 and r.days and r.next_after(1_790_000_000.0) > 1_790_000_000.0
