"""Simulated time reaches the gateway: a gateway started with BINLINK_SIM_CLOCK stamps the
simulator's time, so its forecast sees the days the bins lived (issue 21)."""
import time

from binlink.gateway import planner, simclock
from binlink.wire import codec, framing
from tests.harness import KEY, GatewayProcess, Subscriber, wait_for

T0 = 1_797_000_000.0  # simulated: days after the wall clock of the test


def test_the_reader_follows_the_writer_never_goes_back_and_stops_with_the_simulation(tmp_path):
    path = str(tmp_path / "clock")
    w = simclock.ClockWriter(path, speed=1000.0)
    w.set(T0, running=False)
    r = simclock.SimClock(path)
    assert r() == T0  # not running: it stands still
    w.set(T0 + 3600)
    now = r()
    assert T0 + 3600 <= now <= T0 + 3600 + simclock.MAX_AHEAD_S * 1000  # runs on at the speed, bounded
    w.set(T0 + 10)  # a write behind what was already read: the clock does not go back
    assert r() >= now
    w.close(T0 + 7200)
    assert r() == T0 + 7200
    assert r() == T0 + 7200


def test_gateway_on_simulated_time_publishes_a_forecast_after_simulated_hours(tmp_path, broker, pty, monkeypatch):
    """Twenty simulated hours of hourly readings, sent within seconds of wall time: the state's
    measured_at is the simulated time and fill_rate_pct_per_day and full_at are filled (on the
    wall clock the forecast would have seen seconds go by and stayed null)."""
    clock_path = str(tmp_path / "simclock")
    w = simclock.ClockWriter(clock_path, speed=0.0)
    w.set(T0, running=False)
    monkeypatch.setenv(simclock.ENV, clock_path)
    gw = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=[(0xA1, "bin-a", KEY, 1200, 200)]).start()
    sub = Subscriber(broker.port, topics=("binlink/testcity/bin/+/state",))
    try:
        for n in range(1, 21):  # 1.5 points an hour
            w.set(T0 + n * 3600, running=False)
            pty.write(framing.frame(codec.encode_reading(KEY, 0xA1, n, 1200 - 10 * (10 + 1.5 * n), 20, 3700, 0, 5, 5)))
            state = wait_for(lambda: [s for s in sub.json("bin-a/state") if s["fcnt"] == n], what="state %d" % n)[-1]
        assert planner.parse_iso(state["measured_at"]) == T0 + 20 * 3600
        assert state["time_synced"] is False  # simulated time is not a synchronised clock's, and says so
        assert 30 < state["fill_rate_pct_per_day"] < 42
        full_at = planner.parse_iso(state["full_at"])
        assert 20 * 3600 < full_at - (T0 + 20 * 3600) < 50 * 3600  # 90 % from 40 %: ~33 h at 1.5 an hour
        assert "SIMULATED TIME" in open(gw.log_path).read()
    finally:
        sub.close()
        gw.kill()
        w.close()


def test_without_the_variable_the_gateway_keeps_the_wall_clock(tmp_path, broker, pty, monkeypatch):
    monkeypatch.delenv(simclock.ENV, raising=False)
    gw = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=[(0xA1, "bin-a", KEY, 1200, 200)]).start()
    sub = Subscriber(broker.port, topics=("binlink/testcity/bin/+/state",))
    try:
        pty.write(framing.frame(codec.encode_reading(KEY, 0xA1, 1, 900, 20, 3700, 0, 5, 5)))
        state = wait_for(lambda: sub.json("bin-a/state"), what="state")[-1]
        assert abs(planner.parse_iso(state["measured_at"]) - time.time()) < 120
    finally:
        sub.close()
        gw.kill()


def test_the_fleet_drives_the_clock_file(tmp_path):
    from binlink.sim.fleet import Fleet

    path = str(tmp_path / "clock")
    fleet = Fleet(2, seed=1, t0=T0, clock_file=path)
    clock = simclock.SimClock(path)
    assert clock() == T0
    fleet.run(6 * 3600)
    assert T0 + 5 * 3600 < clock() <= T0 + 6 * 3600  # the last wake; stopped: it stands still
    fleet.close()
