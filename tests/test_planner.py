"""The collection list: its rules, and `binlink planner` / `binlink plan` against a real Mosquitto
with the gateway as its own process feeding it."""
import json
import subprocess
from datetime import datetime, timezone

import pytest

from binlink.gateway import planner
from binlink.wire import codec, framing
from tests.harness import BINLINK, KEY, KEY2, GatewayProcess, Subscriber, wait_for


def ts(text):
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def test_next_round_skips_days_without_trucks():
    routes = planner.Routes.parse("mon,tue,wed,thu,fri,sat", 7)
    assert routes.next_after(ts("2026-11-27T06:00")) == ts("2026-11-27T07:00")  # Friday, before the trucks
    assert routes.next_after(ts("2026-11-27T07:00")) == ts("2026-11-28T07:00")  # strictly after
    assert routes.next_after(ts("2026-11-28T09:00")) == ts("2026-11-30T07:00")  # Saturday → Monday
    with pytest.raises(ValueError, match="route days"):
        planner.Routes.parse("mon,someday", 7)


def test_plan_lists_due_bins_most_urgent_first():
    now = ts("2026-11-27T06:00")
    iso = planner.iso
    states = {
        "later": {"fill_pct": 40.0, "full_at": iso(now + 5 * 86400)},
        "soon": {"fill_pct": 70.0, "full_at": iso(now + 30 * 3600), "lat": 52.5, "lon": 13.4, "name": "Market"},
        "sooner": {"fill_pct": 80.0, "full_at": iso(now + 10 * 3600)},
        "full": {"fill_pct": 100.0, "full_at": iso(now - 3600)},
        "new": {"fill_pct": 85.0, "full_at": None},  # no forecast yet, but fairly full
        "new-empty": {"fill_pct": 10.0, "full_at": None},
        "faulty": {"fill_pct": None, "full_at": None},
    }
    body = planner.plan_message(states, now, planner.Routes(), margin_s=6 * 3600)
    assert body["next_round"] == "2026-11-27T07:00:00Z" and body["horizon"] == "2026-11-28T13:00:00Z"
    assert [b["bin_id"] for b in body["bins"]] == ["full", "new", "sooner", "soon"]
    assert [b["reason"] for b in body["bins"]] == ["full", "no_forecast", "forecast", "forecast"]
    soon = body["bins"][3]
    assert (soon["lat"], soon["lon"], soon["name"]) == (52.5, 13.4, "Market")
    text = planner.format_plan(dict(body, bins_known=len(states)))
    assert "4 of 7" in text and "52.50000,13.40000" in text


def test_planner_and_plan_over_mosquitto_with_the_gateway_feeding_it(tmp_path, broker, pty):
    """Gateway (own process) publishes states; `binlink planner` (own process) publishes the
    retained list; `binlink plan` prints it. A full bin is on it, a nearly empty one is not."""
    from binlink.gateway import registry

    gw = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=[])
    registry.write(gw.registry, {"device": []})
    registry.add(gw.registry, 0xA1, "bin-a", KEY, 1200, 200, name="Market square", lat=52.52, lon=13.405)
    registry.add(gw.registry, 0xB2, "bin-b", KEY2, 1000, 100)
    gw.start()
    plan_proc = None
    sub = Subscriber(broker.port, topics=("binlink/testcity/plan",))
    try:
        pty.write(framing.frame(codec.encode_reading(KEY, 0xA1, 1, 190, 20, 3700, 0, 5, 5)))  # at the brim
        pty.write(framing.frame(codec.encode_reading(KEY2, 0xB2, 1, 950, 20, 3700, 0, 5, 5)))  # nearly empty
        state_sub = Subscriber(broker.port, topics=("binlink/testcity/bin/+/state",))
        state = wait_for(lambda: state_sub.json("bin-a/state"), what="bin-a state")[0]
        state_sub.close()
        assert (state["lat"], state["lon"], state["name"]) == (52.52, 13.405, "Market square")
        assert "fill_rate_pct_per_day" in state and "full_at" in state
        plan_proc = subprocess.Popen([BINLINK, "planner", "--host", "127.0.0.1", "--port", str(broker.port), "--site", "testcity",
                                      "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        body = wait_for(lambda: [m for m in sub.json("/plan") if m["bins_known"] == 2], timeout=30, what="the list")[-1]
        assert [b["bin_id"] for b in body["bins"]] == ["bin-a"]
        assert body["bins"][0]["reason"] == "full" and body["bins"][0]["lat"] == 52.52
        # the view: retained, so it answers at once
        r = subprocess.run([BINLINK, "plan", "--host", "127.0.0.1", "--port", str(broker.port), "--site", "testcity"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert "bin-a" in r.stdout and "bin-b" not in r.stdout and "1 of 2" in r.stdout
        r = subprocess.run([BINLINK, "plan", "--port", str(broker.port), "--site", "testcity", "--json"],
                           capture_output=True, text=True, timeout=30)
        assert json.loads(r.stdout)["bins"][0]["bin_id"] == "bin-a"
        # the bin is emptied: the next list no longer has it
        pty.write(framing.frame(codec.encode_reading(KEY, 0xA1, 2, 1150, 20, 3700, 0, 5, 5)))
        wait_for(lambda: sub.json("/plan")[-1]["bins"] == [], timeout=30, what="list emptied")
        r = subprocess.run([BINLINK, "plan", "--port", str(broker.port), "--site", "nowhere", "--timeout", "1"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "is `binlink planner` running?" in r.stderr
    finally:
        sub.close()
        if plan_proc is not None:
            plan_proc.terminate()
            assert plan_proc.wait(10) == 0
        gw.kill()


def test_gateway_learns_the_forecast_and_keeps_it_through_a_restart(tmp_path, broker, pty):
    """A day of backlog (hourly readings, ~1.5 points an hour) teaches the gateway the bin's rate:
    its retained state carries fill_rate_pct_per_day and full_at; after a restart the next reading
    still has them (a forgotten forecast would publish null for the first 12 hours)."""
    gw = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=[(0xA1, "bin-a", KEY, 1200, 200)]).start()
    sub = Subscriber(broker.port, topics=("binlink/testcity/bin/+/state",))
    try:
        entries = [(n, (25 - n) * 60, codec.pack_reading(1200 - 10 * (10 + 1.5 * n), 20, 3700, 0, 5, 5)) for n in range(1, 25)]
        pty.write(framing.frame(codec.encode_backlog(KEY, 0xA1, 25, entries)))
        state = wait_for(lambda: [s for s in sub.json("bin-a/state") if s["fcnt"] == 24], what="state after the backlog")[-1]
        assert 30 < state["fill_rate_pct_per_day"] < 42  # 1.5 points an hour = 36 a day
        full_at = planner.parse_iso(state["full_at"])
        measured = planner.parse_iso(state["measured_at"])
        assert 30 * 3600 < full_at - measured < 60 * 3600  # 46 points to go at ~1.5 an hour
        gw.terminate()
        gw.start()
        pty.write(framing.frame(codec.encode_reading(KEY, 0xA1, 26, 1200 - 10 * (10 + 1.5 * 25), 20, 3700, 0, 5, 5)))
        after = wait_for(lambda: [s for s in sub.json("bin-a/state") if s["fcnt"] == 26], what="state after the restart")[-1]
        assert after["fill_rate_pct_per_day"] is not None and abs(after["fill_rate_pct_per_day"] - state["fill_rate_pct_per_day"]) < 6
        assert after["full_at"] is not None
    finally:
        sub.close()
        gw.kill()
