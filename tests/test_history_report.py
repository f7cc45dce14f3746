"""What a planner acts on, from a real site's published states: the planner's history, the bins
that overflow again and again, the sensors gone quiet, and `binlink report` on that history
(the same figures and charts `binlink sim --report` draws for a simulated site)."""
import json
import subprocess

from binlink.gateway import history, planner
from binlink.sim import report
from tests.harness import BINLINK

H = 3600.0
T0 = 1_790_000_000.0


def state(bin_id, t, fill, full_at=None, name=None):
    return {"bin_id": bin_id, "measured_at": planner.iso(t), "fill_pct": fill, "full_at": None if full_at is None else planner.iso(full_at),
            "fill_rate_pct_per_day": 20.0, "name": name, "lat": 52.5, "lon": 13.4}


def site(path):
    """Twenty days, hourly: 'hot' fills 10 %/h... overflows and waits a day, three times; 'calm' is
    emptied at 80 % every three days; 'quiet' stops reporting after day 5."""
    h = history.History(str(path))
    for k in range(20 * 24):
        t = T0 + k * H
        day, hour = divmod(k, 24)
        h.add(state("hot", t, min(115.0, 10.0 * ((k % 72) - 48)) if k % 72 >= 48 else 5.0, name="Station forecourt"))
        h.add(state("calm", t, 10.0 + 70.0 * (k % 72) / 72.0, full_at=t + (72 - k % 72) * H))
        if day < 5:
            h.add(state("quiet", t, 40.0, name="Park gate"))
    h.flush(T0 + 20 * 24 * H)
    return h


def test_hot_spots_are_the_bins_that_overflow_again_and_again(tmp_path):
    h = site(tmp_path / "h.sqlite")
    hot = history.hot_spots(h, T0 + 20 * 24 * H, days=28)
    assert [x["bin_id"] for x in hot] == ["hot"]
    assert hot[0]["overflows"] == 6 and hot[0]["name"] == "Station forecourt"  # 20 days / 3-day cycle, each emptied
    pickups, over = history.episodes([(T0, 50.0), (T0 + H, 101.0), (T0 + 2 * H, 104.0), (T0 + 3 * H, 3.0), (T0 + 4 * H, 100.0)])
    assert pickups == [T0 + 3 * H] and over == [(T0 + H, T0 + 3 * H), (T0 + 4 * H, T0 + 4 * H)]
    h.close()


def test_the_history_survives_a_restart_and_ignores_what_is_not_a_reading(tmp_path):
    path = tmp_path / "h.sqlite"
    h = history.History(str(path))
    h.add(state("a", T0, 50.0))
    h.add({"bin_id": "a", "measured_at": None, "fill_pct": 60.0})
    h.add({"bin_id": "a", "measured_at": "not a time", "fill_pct": 60.0})
    h.add(dict(state("a", T0 + H, 55.0), fill_pct="sixty", lat=True))
    h.close()
    series, info = history.History(str(path)).series()
    assert series == {"a": [(T0, 50.0, None, 20.0), (T0 + H, None, None, 20.0)]} and info["a"] == (None, None, 13.4)


def test_report_from_a_real_sites_history(tmp_path):
    path = tmp_path / "h.sqlite"
    site(path).close()
    out = tmp_path / "site.html"
    r = subprocess.run([BINLINK, "report", "--history", str(path), "--out", str(out), "--days", "20", "--chart-bins", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout.splitlines()[0])
    assert figures["bins"] == 3 and figures["collections"] >= 12  # hot and calm emptied every three days
    text = out.read_text()
    assert text.count('class="bin"') == 2 and "Station forecourt" in text  # the most overflowing bin charted first
    hot_table = text.split("Overflow hot spots")[1].split("Quiet sensors")[0]
    assert "hot" in hot_table and "calm" not in hot_table
    quiet_table = text.split("Quiet sensors")[1].split("<h2>")[0]
    assert "Park gate" in quiet_table and "360" in quiet_table  # silent for the last 15 days
    r = subprocess.run([BINLINK, "report", "--history", str(tmp_path / "none.sqlite"), "--out", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no history" in r.stderr


def test_the_simulated_report_takes_its_site_figures_from_the_same_code():
    from binlink.sim import policy

    run = policy.simulate("forecast", bins=6, days=3, seed=4, keep_series=0, warmup_days=2)
    s = run["site"]
    assert s["bins"] == 6 and s["collections"] > 0 and {"hot_spots", "quiet"} <= set(s)
    assert "Overflow hot spots" in report.render({"fixed": dict(run, series={}), "forecast": dict(run, series={}),
                                                   "collections_saved_pct": 0, "forecast_full_at_mae_h": 1, "forecast_scored": 1,
                                                   "route_km_saved_pct": None})


def test_the_planner_names_hot_spots_from_its_history_in_the_list(tmp_path):
    from binlink.gateway import config, planner_cli

    h = site(tmp_path / "h.sqlite")
    now = T0 + 20 * 24 * H
    p = planner.Planner(config.Mqtt(), "binlink/x", planner.Routes(), 0, clock=lambda: now, history=h)
    for name in ("hot", "calm"):
        p.states[name] = state(name, now - 600, 50.0)
    body = p.message()
    assert [x["bin_id"] for x in body["hot_spots"]] == ["hot"]
    assert "overflow hot spots" in planner_cli.format_plan(body)
    h.close()
