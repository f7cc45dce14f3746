"""Closing the loop in the simulator, and the planner's report rendered and read back."""
import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from binlink.sim import policy, report
from tests.harness import BINLINK

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def comparison():
    return policy.compare(bins=12, days=10, seed=3, keep_series=2)


def test_fixed_patterns_follow_how_fast_a_bin_fills():
    assert policy.fixed_pattern(2.0) == (0, 1, 2, 3, 4, 5)  # every round
    assert policy.fixed_pattern(4.0) == (0, 2, 4)
    assert policy.fixed_pattern(6.0) == (0, 3)
    assert policy.max_gap_days((0, 3)) == 4 and policy.max_gap_days((0,)) == 7


def test_trucks_empty_what_overflows_during_the_round_first_and_the_rest_as_late_as_they_can():
    from binlink.gateway.planner import iso

    t = 1_790_000_000.0
    listed = [{"bin_id": "full", "reason": "full", "full_at": iso(t - 600)},
              {"bin_id": "in-2h", "reason": "forecast", "full_at": iso(t + 2 * 3600)},
              {"bin_id": "in-1h", "reason": "forecast", "full_at": iso(t + 3600)},
              {"bin_id": "tomorrow", "reason": "forecast", "full_at": iso(t + 20 * 3600)},
              {"bin_id": "tonight", "reason": "forecast", "full_at": iso(t + 12 * 3600)}]
    order = [b["bin_id"] for b in policy.dispatch_order(listed, t + 6 * 3600)]
    assert order == ["full", "in-1h", "in-2h", "tomorrow", "tonight"]


def test_the_list_driven_trucks_collect_less_than_fixed_rounds(comparison):
    fixed, fc = comparison["fixed"], comparison["forecast"]
    assert fc["collections"] < fixed["collections"]
    assert comparison["collections_saved_pct"] > 0
    assert comparison["forecast_scored"] > 10 and comparison["forecast_full_at_mae_h"] < 6
    assert fixed["bins"] == fc["bins"] == 12 and fixed["start"] == fc["start"]


def test_the_bound_is_what_knowing_each_bins_filling_speed_would_save_and_shrinks_with_the_margin(comparison):
    """policy.bound: the same bins and rounds listed from the truth. Physics only: fixed rounds
    collect exactly as in the firmware runs; a larger margin lists bins earlier (saves less); the
    forecast, which must measure and learn, does not beat the truth on average."""
    wide, narrow = policy.bound(bins=60, days=14, seed=3, margin_h=6.0), policy.bound(bins=60, days=14, seed=3, margin_h=0.0)
    assert 0 < wide < narrow < 60
    assert comparison["collections_saved_bound_pct"] == policy.bound(bins=12, days=10, seed=3, margin_h=policy.MARGIN_H)
    assert comparison["collections_saved_pct"] <= comparison["collections_saved_bound_pct"] + 10


def test_the_runs_in_worker_processes_give_the_same_figures():
    """compare(processes=3), as the bench and the report run it: the districts in worker
    interpreters, every figure and series as when they run one after the other here."""
    args = dict(bins=6, days=3, seed=4, keep_series=2)
    assert policy.compare(processes=3, **args) == policy.compare(**args)


def test_fixed_rounds_at_every_round_collect_most_and_are_reported(comparison, tmp_path):
    """The most a fixed schedule can do (every bin on every round) collects more than the tailored
    patterns, overflows no more, and the report says both beside the list's figures."""
    every = comparison["collections_per_bin_month_fixed_every_round"]
    assert every > comparison["fixed"]["collections_per_bin_month"] > comparison["forecast"]["collections_per_bin_month"]
    assert comparison["overflow_bin_hours_fixed_every_round"] <= comparison["overflow_bin_hours_fixed"]
    fc = comparison["forecast"]
    rounds, t = 0, policy.ROUTES.next_after(fc["start"] - 1)
    while t < fc["end"]:
        rounds, t = rounds + 1, policy.ROUTES.next_after(t)
    assert every == round(rounds * 30.0 / fc["days"], 2)  # each bin emptied at each of the window's rounds
    text = report.render(comparison)
    assert "every bin on every round would take %s collections per bin-month" % every in text


def test_a_fixed_round_fares_the_same_whether_or_not_the_bins_run_their_firmware():
    """Under fixed rounds only the charted bins run their firmware (a fixed round reads no
    measurement): with every bin's firmware running, or none, the same collections and overflow
    (it caught the bins' waste drawing from their sensors' random stream, and a learning week's
    rounds left behind when no bin woke before the count began)."""
    everyone = policy.simulate("fixed", bins=10, days=6, seed=5, keep_series=10, warmup_days=2)
    charted = policy.simulate("fixed", bins=10, days=6, seed=5, keep_series=2, warmup_days=2)
    none = policy.simulate("fixed", bins=10, days=6, seed=5, keep_series=0, warmup_days=2)  # no firmware at all
    assert everyone["collections"] == charted["collections"] == none["collections"] > 0
    assert everyone["overflow_bin_hours"] == charted["overflow_bin_hours"] == none["overflow_bin_hours"] > 0
    assert set(charted["series"]) == set(list(everyone["series"])[:2])
    assert charted["series"] == {b: everyone["series"][b] for b in charted["series"]}


def test_a_bin_fares_the_same_in_whichever_district_runs_it(monkeypatch):
    """The fleet runs as districts (one truck each; a city's report in parallel): without rounds
    (the reactive run), each bin's readings, forecasts and pickups are its own whatever the split."""
    whole = policy.simulate("reactive", bins=6, days=3, seed=2, keep_series=6, warmup_days=1)
    monkeypatch.setattr(policy, "DISTRICT_BINS", 2)
    assert len(policy.districts(6)) == 3
    split = policy.simulate("reactive", bins=6, days=3, seed=2, keep_series=6, warmup_days=1)
    assert split["series"] == whole["series"] and split["collections"] == whole["collections"] > 0
    assert sorted(split["forecast_errors_h"]) == sorted(whole["forecast_errors_h"])


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []
        self.text = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_report_renders_each_bin_and_the_policies(comparison, tmp_path):
    path = tmp_path / "report.html"
    report.write(str(path), comparison)
    text = path.read_text()
    parsed = _Collect()
    parsed.feed(text)
    # self-contained: nothing fetched from elsewhere
    assert not [a for _, a in parsed.tags for k, v in a.items() if k in ("src", "href") and v]
    assert not any(t in ("script", "img", "link", "iframe") for t, _ in parsed.tags)
    body = " ".join(parsed.text)
    assert "%s" % comparison["collections_saved_pct"] in body and "overflow bin-hours" in body
    svgs = [ET.fromstring(s) for s in re.findall(r"<svg.*?</svg>", text, re.S)]  # each one well-formed XML
    bins = [s for s in svgs if s.get("class") == "bin"]
    assert [b.get("data-bin") for b in bins] == sorted(comparison["forecast"]["series"])
    for chart in bins:
        s = comparison["forecast"]["series"][chart.get("data-bin")]
        lines = {p.get("class"): p for p in chart.iter(SVG + "polyline")}
        assert set(lines) == {"truth", "published"}
        for name in ("truth", "published"):
            points = [tuple(map(float, xy.split(","))) for xy in lines[name].get("points").split()]
            assert len(points) == len(s[name])
            xs = [x for x, _ in points]
            assert xs == sorted(xs) and all(0 <= x <= report.W and 0 <= y <= report.H for x, y in points)
        pickups = [e for e in chart.iter(SVG + "line") if e.get("class") == "pickup"]
        assert len(pickups) == len(s["pickups"]) > 0
        assert [e for e in chart.iter(SVG + "line") if e.get("class") == "forecast"]
        # a fuller bin is drawn higher: the highest published point is the fullest reading
        top = min(points, key=lambda p: p[1])
        assert abs(report._y(max(v for _, v in s["published"])) - top[1]) < 0.11
    bars = [r for s in svgs if s.get("class") == "policies" for r in s.iter(SVG + "rect")]
    assert len(bars) == 4


@pytest.mark.skipif(shutil.which("rsvg-convert") is None, reason="librsvg (rsvg-convert) not installed")
def test_report_charts_rasterise(comparison, tmp_path):
    """The charts render in a real SVG renderer (librsvg), not only parse."""
    text = report.render(comparison)
    for i, svg in enumerate(re.findall(r"<svg.*?</svg>", text, re.S)):
        src, png = tmp_path / ("c%d.svg" % i), tmp_path / ("c%d.png" % i)
        src.write_text(svg)
        subprocess.run(["rsvg-convert", str(src), "-o", str(png)], check=True, timeout=30)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_sim_report_command(tmp_path):
    out = tmp_path / "r.html"
    r = subprocess.run([BINLINK, "sim", "--report", str(out), "--bins", "6", "--days", "4", "--chart-bins", "2", "--trucks", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout.strip().splitlines()[-2])
    assert {"collections_saved_pct", "overflow_bin_hours_fixed", "overflow_bin_hours_forecast",
            "forecast_full_at_mae_h", "route_km_saved_pct", "hot_spots", "quiet_sensors"} <= set(figures)
    assert figures["route_km_saved_pct"] >= 0  # the solver's routes are never longer than list order
    assert "shorter.</p>" in out.read_text()
    assert out.read_text().count('class="bin"') == 2 and out.read_text().count('class="bin-fixed"') == 2  # both policies charted
    bad = subprocess.run([BINLINK, "sim", "--bins", "2"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--link and --registry are required" in bad.stderr
    assert os.path.exists(out)


def test_a_faulty_reading_keeps_the_simulated_bin_heard_as_the_gateway_does():
    """An overfull bin often reads nothing (fill null). The gateway still publishes its state after
    that reading, so the planner must not take it for a quiet sensor: the simulation's state too."""
    from binlink.gateway import planner as planner_mod, registry
    from binlink.gateway.config import Events

    device = registry.Device(0x101, "bin-001", b"k" * 16, 1200, 250, "Bin", 52.5, 13.4)
    tr = policy.Tracked(None, device, False)
    rules = Events()
    t0 = policy.START
    for k in range(30):  # 2 points an hour: learned, forecast to 90 %
        policy._reading(tr, 30.0 + 2.0 * k, t0 + k * 3600, rules)
    full_at = tr.state["full_at"]
    assert full_at is not None
    for k in range(30, 50):  # a day of faulty readings
        policy._reading(tr, None, t0 + k * 3600, rules)
    assert tr.state["measured_at"] == planner_mod.iso(t0 + 49 * 3600) and tr.state["fill_pct"] is None
    assert tr.state["full_at"] == full_at
    body = planner_mod.plan_message({"bin-001": tr.state}, t0 + 49 * 3600 + 60, policy.ROUTES, 0)
    assert [b["bin_id"] for b in body["bins"]] == ["bin-001"] and body["quiet"] == []
