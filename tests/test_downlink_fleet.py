"""The fleet whose gateway answers (simulator/fleet_downlink.py): real firmware on the part models,
one channel, the gateway's own transmissions on it."""
import pytest
from binlink.firmware import state
from binlink.sim.fleet_downlink import DownlinkFleet

from tests.bench_downlink_fleet import delivered_pct, max_hour_share

HOUR = 3600
T0 = 1_790_000_000.0  # the physics and the bins' timing follow the clock: a run is its seed and its start


@pytest.fixture(scope="module")
def crowded():
    """50 bins on one 300 m site reporting every wake (15 min) for 8 h, without and with answers:
    about 2 % of their packets collide (pure ALOHA), the same bins on the same channel both times."""
    runs = {}
    for answer in (False, True):
        runs[answer] = DownlinkFleet(50, answer=answer, seed=3, radius_m=300.0, report_s=900, t0=T0)
        runs[answer].run(8 * HOUR)
    return runs


def test_readings_lost_on_air_without_downlinks_are_delivered_with_them(crowded):
    """Without answers what collides is gone; with them the ack shows the bin what is missing and
    it resends it. From the second hour (a bin tracks its readings once it has heard a gateway)
    to two hours before the end (a listening cycle is 6 reports: 90 min)."""
    without, with_dl = crowded[False], crowded[True]
    window = (without.t0 + HOUR, without.t0 + 6 * HOUR)
    assert without.channel.stats["lost_collision"] > 10
    assert delivered_pct(without, *window)[0] < 98.5
    assert delivered_pct(with_dl, *window)[0] >= 99.9


def test_the_gateway_never_transmits_while_receiving_a_packet_it_stores(crowded):
    fleet = crowded[True]
    sent = fleet.gateway.sent
    assert len(sent) > 100
    for start, end, radio in fleet.gateway.accepted:
        assert not any(s < end and start < e for s, e, r in sent if r == radio)


def test_rylr998_bins_hear_their_answers_as_rcv_and_resend_what_collided():
    """The same crowded site with RYLR998 bins: the gateway's answers go out in the module's own
    AT format, each bin's module hands them over as +RCV, and what collided is resent."""
    runs = {}
    for answer in (False, True):
        runs[answer] = DownlinkFleet(50, answer=answer, seed=3, radius_m=300.0, report_s=900, t0=T0, fmt="rylr998")
        runs[answer].run(8 * HOUR)
    without, with_dl = runs[False], runs[True]
    window = (without.t0 + HOUR, without.t0 + 6 * HOUR)
    lost_without = 100.0 - delivered_pct(without, *window)[0]
    lost_with = 100.0 - delivered_pct(with_dl, *window)[0]
    assert without.channel.stats["lost_collision"] > 10 and lost_without > 1.5
    assert lost_with < min(0.5, lost_without / 4)
    assert all(d.hw.radio.received for d in with_dl.devices)  # every bin heard answers (+RCV)
    sent = with_dl.gateway.sent
    for start, end, radio in with_dl.gateway.accepted:
        assert not any(s < end and start < e for s, e, r in sent if r == radio)


def test_a_bin_out_of_range_for_a_week_runs_the_new_settings_when_it_returns():
    fleet = DownlinkFleet(6, seed=5, t0=T0)
    fleet.run(2 * HOUR)
    away = fleet.devices[1].device_id
    fleet.in_range[away] = False  # its antenna buried under a pile of waste, say
    fleet.gateway.set_desired({"report_s": 1800})
    gone = fleet.now
    fleet.run(7 * 24 * HOUR)
    back = fleet.now
    g = fleet.gateway
    assert all(g.reported[d] == g.desired_hash(d) for d in g.keys if d != away)
    assert g.reported[away] != g.desired_hash(away)
    fleet.in_range[away] = True
    fleet.run(14 * HOUR)  # it listens after every 6th report: two chances, one may be lost on air
    assert g.reported[away] == g.desired_hash(away)
    # and the newest readings of its week away (its backlog holds BACKLOG_CAP; older ones are dropped
    # and counted on the bin) reach the gateway, acknowledged and resent in batches
    stored = {("%06x" % dev, fcnt) for dev, fcnt in g.readings}
    made = sorted((v[2], k) for k, v in fleet.truth.readings.items() if k[0] == "%06x" % away and gone <= v[2] < back)
    assert len(made) > state.BACKLOG_CAP
    assert all(k in stored for _, k in made[-state.BACKLOG_CAP:])


def test_a_refused_setting_is_never_sent():
    fleet = DownlinkFleet(2, seed=1)
    try:
        fleet.gateway.set_desired({"report_s": 60})  # shorter than the wake interval: the bin would refuse it
    except ValueError as e:
        assert "report_s" in str(e)
    else:
        raise AssertionError("the gateway took a setting the bin refuses")


def test_the_schedule_is_the_same_for_a_seed():
    def run():
        fleet = DownlinkFleet(12, seed=9, radius_m=300.0, powered_within_s=60, t0=T0)
        fleet.run(4 * HOUR)
        return fleet.gateway.readings, fleet.gateway.sent, fleet.channel.stats, fleet.clock_errors

    assert run() == run()


def test_the_busiest_hour_counts_airtime_in_any_hour_not_per_clock_hour():
    spans = [(3500.0, 3536.0), (3700.0, 3736.0)]  # 72 s within one sliding hour, split by the clock hour
    assert max_hour_share(spans, 0, 10 * HOUR) == 72.0 / HOUR


def test_a_packet_is_lost_when_another_bins_or_the_gateways_overlaps_it_whichever_began_first():
    """Two bins side by side (equal levels: no capture), no fading or random loss, switched on
    within half a second: a packet is stored exactly when neither the other bin's packets nor the
    gateway's answers overlap it, also when the overlapping one comes from a wake that began later
    or is an answer decided while the packet was already on air."""
    overlapped = talked_over = 0
    for seed in range(1, 13):  # until both kinds of overlap have happened
        if overlapped and talked_over:
            break
        fleet = DownlinkFleet(2, seed=seed, t0=T0, powered_within_s=0.5,
                              channel={"fading_db": 0.0, "loss": 0.0, "bit_errors": 0.0})
        for d in fleet.devices:
            d.xy = (400.0, 0.0)
        fleet.run(60)
        stored = {(s, e) for s, e, _ in fleet.gateway.accepted}
        for dev, spans in fleet.bin_tx.items():
            others = [span for d, v in fleet.bin_tx.items() if d != dev for span in v]
            for s, e in spans:
                hit = any(a < e and s < b for a, b in others)
                over = any(a < e and s < b for a, b, _ in fleet.gateway.sent)
                overlapped += hit
                talked_over += over
                assert ((s, e) in stored) == (not hit and not over)
    assert overlapped and talked_over  # both cases happened
