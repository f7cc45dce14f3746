"""The planner's morning on a simulated site (issue 21, "Done when"): a fleet on simulated time
into a real gateway process and a real Mosquitto; the planner on the same clock publishes a list
with forecasts and a truck's route; `binlink plan` prints it and exports it."""
import csv
import json
import subprocess
import threading

from binlink.gateway import planner, simclock
from tests.harness import BINLINK, GatewayProcess, Subscriber, wait_for


def test_simulated_days_give_forecasts_a_list_and_routes(tmp_path, broker, monkeypatch):
    from binlink.sim.fleet import Fleet

    clock_path = str(tmp_path / "simclock")
    link = str(tmp_path / "radio0")
    gw = GatewayProcess(tmp_path, broker.port, [("radio0", link, "raw")])
    fleet = Fleet(8, seed=3, links=[link], registry_path=gw.registry, speed=7200.0, clock_file=clock_path,
                  channel={"loss": 0.0, "duplicates": 0.0, "bit_errors": 0.0})
    monkeypatch.setenv(simclock.ENV, clock_path)
    gw.start()
    sub = Subscriber(broker.port, topics=("binlink/testcity/bin/+/state", "binlink/testcity/plan"))
    plan_proc = None
    try:
        runner = threading.Thread(target=fleet.run, args=(30 * 3600.0,), daemon=True)  # 30 simulated hours, ~15 s
        runner.start()
        runner.join(120)
        assert not runner.is_alive()
        fleet.links[0].wait_drained(10)
        # the gateway's states: measured on simulated time, with a forecast after a day of readings
        latest = lambda: {s["bin_id"]: s for s in sub.json("/state")}
        wait_for(lambda: len([s for s in latest().values() if s["full_at"]]) >= 6, timeout=60, what="forecasts in the states")
        states = latest()
        assert all(s["fill_rate_pct_per_day"] is not None for s in states.values() if s["full_at"])
        assert max(planner.parse_iso(s["measured_at"]) for s in states.values()) > fleet.t0 + 24 * 3600
        # the planner on the same clock: its rounds come on simulated days; one truck
        plan_proc = subprocess.Popen([BINLINK, "planner", "--port", str(broker.port), "--site", "testcity", "--sim-clock", clock_path,
                                      "--interval", "0.3", "--margin-h", "168", "--trucks", "1", "--truck-capacity", "20",
                                      "--history", str(tmp_path / "h.sqlite")],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        body = wait_for(lambda: [m for m in sub.json("/plan") if m["bins_known"] == 8], timeout=60, what="the list")[-1]
        assert planner.parse_iso(body["next_round"]) > fleet.now - 1  # rounds after the simulated now, not the wall clock
        forecast = [b for b in body["bins"] if b["reason"] == "forecast"]
        assert forecast and all(b["full_at"] and b["name"] and b["age_h"] is not None for b in forecast)
        routed = [s["bin_id"] for t in body["routes"]["trucks"] for s in t["stops"]]
        assert sorted(routed + body["routes"]["unrouted"]) == sorted(b["bin_id"] for b in body["bins"])
        r = subprocess.run([BINLINK, "plan", "--port", str(broker.port), "--site", "testcity", "--csv", str(tmp_path / "r.csv"),
                            "--geojson", str(tmp_path / "r.geojson")], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "truck 1:" in r.stdout and forecast[0]["bin_id"] in r.stdout
        rows = list(csv.DictReader(open(tmp_path / "r.csv")))
        assert [row["bin_id"] for row in rows if row["truck"]] == routed
        features = json.load(open(tmp_path / "r.geojson"))["features"]
        assert sum(f["geometry"]["type"] == "LineString" for f in features) == 1
    finally:
        sub.close()
        if plan_proc is not None:
            plan_proc.terminate()
            out = plan_proc.communicate(timeout=20)[0]
            assert "Traceback" not in out and "published binlink/testcity/plan" in out, out
        gw.kill()
        fleet.close()
