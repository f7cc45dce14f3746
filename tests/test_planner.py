"""The collection list: its rules, and `binlink planner` / `binlink plan` against a real Mosquitto
with the gateway as its own process feeding it."""
import json
import subprocess
from datetime import datetime, timezone

import pytest
from hypothesis import given, strategies

from binlink.gateway import planner, planner_cli
from binlink.wire import codec, framing
from tests.harness import BINLINK, KEY, KEY2, GatewayProcess, Subscriber, wait_for


def ts(text):
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


@given(strategies.floats(min_value=0, max_value=4e9))
def test_times_are_iso_8601_utc_to_the_second(t):
    """What states and lists carry (full_at, measured_at): 'Z' UTC, the second t falls in (a
    fraction is dropped, never rounded up into the next second: isoformat rounded to the
    microsecond first, so 1.9999995 s read 00:00:02), read back as that second."""
    text = planner.iso(t)
    assert text.endswith("Z") and len(text) == 20
    assert text[:19] == datetime.fromtimestamp(int(t), timezone.utc).isoformat()[:19]
    assert planner.parse_iso(text) == float(int(t))


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
    for st in states.values():
        st["measured_at"] = iso(now - 600)
    body = planner.plan_message(states, now, planner.Routes(), margin_s=6 * 3600, full_pct=100.0)
    assert body["next_round"] == "2026-11-27T07:00:00Z" and body["horizon"] == "2026-11-28T13:00:00Z"
    assert [b["bin_id"] for b in body["bins"]] == ["full", "new", "sooner", "soon"]
    assert [b["reason"] for b in body["bins"]] == ["full", "no_forecast", "forecast", "forecast"]
    soon = body["bins"][3]
    assert (soon["lat"], soon["lon"], soon["name"]) == (52.5, 13.4, "Market")
    text = planner_cli.format_plan(dict(body, bins_known=len(states)))
    assert "4 of 7" in text and "Market" in text


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
        assert 18 * 3600 < full_at - measured < 40 * 3600  # to the site's full (90 %): 36 points at ~1.5 an hour
        gw.terminate()
        gw.start()
        pty.write(framing.frame(codec.encode_reading(KEY, 0xA1, 26, 1200 - 10 * (10 + 1.5 * 25), 20, 3700, 0, 5, 5)))
        after = wait_for(lambda: [s for s in sub.json("bin-a/state") if s["fcnt"] == 26], what="state after the restart")[-1]
        assert after["fill_rate_pct_per_day"] is not None and abs(after["fill_rate_pct_per_day"] - state["fill_rate_pct_per_day"]) < 6
        assert after["full_at"] is not None
    finally:
        sub.close()
        gw.kill()


# one meaning per word -------------------------------------------------------------------------
def fresh(now, **kw):
    return dict({"measured_at": planner.iso(now - 600), "full_at": None}, **kw)


def test_full_is_the_sites_full_pct_and_the_list_says_why():
    """A bin at 93 % is full at a site whose full event fires at 90 % (it was `no_forecast` when
    the planner's full meant 100 %); the printed list names it, its fill, its age and why."""
    now = ts("2026-11-27T06:00")
    states = {"b93": fresh(now, fill_pct=93.0, name="Market square"), "b89": fresh(now, fill_pct=89.0),
              "b50": fresh(now, fill_pct=50.0)}
    body = planner.plan_message(states, now, planner.Routes(), 6 * 3600, full_pct=90.0)
    assert [(b["bin_id"], b["reason"]) for b in body["bins"]] == [("b93", "full"), ("b89", "no_forecast")]
    text = planner_cli.format_plan(body)
    row = next(line for line in text.splitlines() if "b93" in line)
    assert "Market square" in row and "93.0" in row and "0.2" in row and ">= 90 %" in row  # name, fill, age (h), why
    assert "full = 90 %" in text


def test_a_silent_bin_is_quiet_not_trusted_and_not_listed():
    now = ts("2026-11-27T06:00")
    states = {"silent": {"fill_pct": 99.0, "full_at": planner.iso(now - 86400), "measured_at": planner.iso(now - 3 * 86400)},
              "never": {"fill_pct": None, "full_at": None},
              "ok": fresh(now, fill_pct=95.0)}
    body = planner.plan_message(states, now, planner.Routes(), 6 * 3600, stale_s=12 * 3600)
    assert [b["bin_id"] for b in body["bins"]] == ["ok"]
    assert [b["bin_id"] for b in body["quiet"]] == ["never", "silent"]
    assert body["quiet"][1]["age_h"] == 72.0 and "72 h" in body["quiet"][1]["why"]
    assert "quiet sensors" in planner_cli.format_plan(body)
    # the same bin, heard an hour ago, is listed again
    states["silent"]["measured_at"] = planner.iso(now - 3600)
    assert "silent" in [b["bin_id"] for b in planner.plan_message(states, now, planner.Routes(), 0)["bins"]]


def test_rounds_are_in_the_sites_time_zone_across_daylight_saving():
    """07:00 in Berlin is 05:00 UTC in summer time and 06:00 UTC after the clocks go back
    (Sunday 25 October 2026)."""
    r = planner.Routes.parse("mon,sat", 7, "Europe/Berlin")
    assert r.next_after(ts("2026-10-23T12:00")) == ts("2026-10-24T05:00")  # Saturday, summer time
    assert r.next_after(ts("2026-10-24T05:00")) == ts("2026-10-26T06:00")  # Monday, winter time
    body = planner.plan_message({}, ts("2026-10-23T12:00"), r, 0)
    assert body["next_round_local"] == "2026-10-24 07:00 CEST"


@pytest.mark.parametrize("args, message", [
    (["--route-hour", "25"], "route hour must be from 0 to below 24"),
    (["--route-hour", "-1"], "route hour"),
    (["--tz", "Mars/Olympus"], "not an IANA zone name"),
    (["--route-days", "mon,funday"], "route days"),
    (["--margin-h", "-3"], "--margin-h"),
    (["--stale-h", "0"], "--stale-h"),
    (["--full-pct", "150"], "--full-pct"),
    (["--trucks", "2", "--truck-capacity", "0"], "capacity"),
    (["--trucks", "2", "--depot", "52.5"], "LAT,LON"),
])
def test_route_settings_are_refused_with_a_clear_error(args, message):
    r = subprocess.run([BINLINK, "planner", "--port", "1"] + args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_planner_waits_for_a_broker_that_is_down_and_republishes_after_it_comes_back(tmp_path):
    """Broker down at start: the planner retries with back-off (one log line, no traceback, no
    exit); once it is up the list is published; the broker restarts without its retained
    messages: the planner is back on its own and publishes the list again."""
    from binlink.sim.broker import Mosquitto, free_port

    port = free_port()
    log_path = tmp_path / "planner.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([BINLINK, "planner", "--port", str(port), "--site", "downcity", "--interval", "0.2"],
                                stdout=log, stderr=subprocess.STDOUT, text=True)
    b = None
    try:
        wait_for(lambda: "unreachable" in log_path.read_text(), timeout=30, what="the unreachable line")
        assert proc.poll() is None
        b = Mosquitto(port).start()
        sub = Subscriber(port, topics=("binlink/downcity/plan",))
        wait_for(lambda: sub.json("/plan"), timeout=30, what="the list once the broker is up")
        sub.close()
        b.kill()
        b.start()
        sub = Subscriber(port, topics=("binlink/downcity/plan",))
        wait_for(lambda: sub.json("/plan"), timeout=60, what="the list again after the broker restarted")
        sub.close()
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(20)
        if b is not None:
            b.stop()
    out = log_path.read_text()
    assert proc.returncode == 0
    assert "Traceback" not in out and out.count("unreachable") == 1, out
    assert "published binlink/downcity/plan" in out and "lost the broker" in out



def test_a_bin_that_reads_nothing_now_is_judged_by_its_last_valid_fill():
    """An overfull bin often reads nothing (the waste is inside the sensor's blind zone): the
    gateway publishes fill null. The planner keeps the last valid fill and lists the bin as full,
    saying why; an older state arriving late (another gateway) does not replace a newer one."""
    now = ts("2026-11-27T06:00")
    old = fresh(now - 3600, fill_pct=96.0)
    faulty = fresh(now, fill_pct=None)
    kept = planner.merge_state(old, faulty)
    assert kept["fill_pct"] is None and kept["last_fill_pct"] == 96.0
    assert planner.merge_state(kept, fresh(now, fill_pct=None))["last_fill_pct"] == 96.0  # faults in a row
    assert planner.merge_state(kept, old) is kept  # older: ignored
    body = planner.plan_message({"b": kept}, now, planner.Routes(), 0)
    assert [b["reason"] for b in body["bins"]] == ["full"] and "sensor reads nothing" in body["bins"][0]["why"]
    assert planner.merge_state(kept, fresh(now + 60, fill_pct=5.0))["fill_pct"] == 5.0  # emptied, read again


@pytest.mark.parametrize("command", ["planner", "plan", "report"])
def test_help_prints(command):
    r = subprocess.run([BINLINK, command, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "usage: binlink %s" % command in r.stdout, r.stderr
