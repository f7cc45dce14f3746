"""Bench `downlink_fleet` (issue 20): 1,000 bins on one channel at SF9, one simulated day on the
co-simulated channel (simulator/fleet_downlink.py), the gateway answering and, side by side, never
answering. The bins were installed over the six hours before the day (a fleet does not boot, and
ask for the time, all at once); a reading's resends get 13 hours after the day (one listening
cycle: the gateway's pace for 1,000 bins is 12.6 h) to arrive. A settings change for every bin is
made as the day starts. The day is run again a day later (`_in_service`: the bins past their
first answers, as a fleet is for most of its years; its readings also counted within two days,
and its settings two days on), with four gateways 1.2 km from the centre instead of one
(`_4_gateways`: each answers what it stored, with its own pace and duty cycle), with a gateway that
never asks for echoes (`_no_echo`: firmware 1.7.0's reading frames then carry none), and with the
bins' RTCs on the ESP32's RC oscillator instead of the reference board's 32.768 kHz crystal
(`_rc`, parts/esp32.py), for the clock."""
import time

from binlink.sim.fleet_downlink import DownlinkFleet

BINS = 1000
WARM_S = 6 * 3600
DAY_S = 24 * 3600
RESEND_S = 13 * 3600
LATE_S = 48 * 3600  # in service, the day's readings are also counted as stored within two days
IN_SERVICE_S = 30 * 3600  # installed over 6 h, a day of service before the day measured
SITES_1 = ((0.0, 0.0, 0.0),)
SITES_4 = ((1200.0, 0.0, 0.0), (0.0, 1200.0, 0.0), (-1200.0, 0.0, 0.0), (0.0, -1200.0, 0.0))  # four gateways
HOUR_S = 3600
CHANGE = {"fire_c": 65}  # a change that leaves the traffic as it is: the delivery figures stay comparable
REPORT_S = 3600  # the fleet's report interval (Fleet's default)
T0 = 1_790_000_000.0  # a fixed start: the physics and the bins' timing follow the clock


def max_hour_share(spans, t_from, t_to):
    """Largest share (0..1) of any hour within [t_from, t_to) that spans (start, end) take."""
    spans = sorted(s for s in spans if t_from <= s[0] < t_to)
    best = 0.0
    j = 0
    busy = 0.0
    for span in spans:  # windows starting at each span: the busiest begins at one
        while j < len(spans) and spans[j][0] < span[0] + HOUR_S:
            busy += spans[j][1] - spans[j][0]
            j += 1
        best = max(best, busy / HOUR_S)
        busy -= span[1] - span[0]
    return best


def delivered_pct(fleet, t_from, t_to, by=None):
    """Readings measured in [t_from, t_to) that the gateway stored (by time `by`), per cent."""
    stored = {("%06x" % dev, fcnt) for (dev, fcnt), t in fleet.gateway.readings.items() if by is None or t <= by}
    measured = [k for k, v in fleet.truth.readings.items() if t_from <= v[2] < t_to]
    return 100.0 * sum(k in stored for k in measured) / len(measured), len(measured)


def converged_pct(fleet):
    g = fleet.gateway
    return 100.0 * sum(g.reported.get(d) == g.desired_hash(d) for d in g.keys) / len(g.keys)


def one_day(bins, seed, answer, rtc="xtal32k", before_s=WARM_S, after_s=RESEND_S, sites=((0.0, 0.0, 0.0),), echo=True):
    """The fleet after its day (before_s after the first bin was installed) and, answering, after_s
    more for the resends; the convergence figures. rtc: the reference board's crystal, or "rc"."""
    fleet = DownlinkFleet(bins, answer=answer, seed=seed, powered_within_s=WARM_S, t0=T0, rtc=rtc, sites=sites, echo=echo)
    fleet.day0 = day0 = fleet.now + before_s
    converged = {}
    if answer:
        fleet.at(day0, lambda: fleet.gateway.set_desired(CHANGE))
        for name, t in (("two_reports", day0 + 2 * REPORT_S), ("end_of_day", day0 + DAY_S), ("two_days", day0 + 2 * DAY_S)):
            fleet.at(t, lambda name=name: converged.update({name: converged_pct(fleet)}))
    fleet.run(before_s + DAY_S + (after_s if answer else 60))
    return fleet, converged


def clock_p(fleet, q):
    errors = sorted(e for t, e in fleet.clock_errors if fleet.day0 <= t < fleet.day0 + DAY_S)
    return round(errors[int(q * (len(errors) - 1))], 2)


def run(bins=BINS, seed=11):
    out = {}
    t_wall = time.perf_counter()
    runs = (("", True, WARM_S, RESEND_S, SITES_1, True), ("_no_downlink", False, WARM_S, 0, SITES_1, True),
            ("_no_echo", True, WARM_S, RESEND_S, SITES_1, False),
            ("_in_service", True, IN_SERVICE_S, LATE_S, SITES_1, True), ("_4_gateways", True, WARM_S, RESEND_S, SITES_4, True))
    for tail, answer, before, after, sites, echo in runs:
        fleet, converged = one_day(bins, seed, answer, before_s=before, after_s=after, sites=sites, echo=echo)
        day = (fleet.day0, fleet.day0 + DAY_S)
        pct, measured = delivered_pct(fleet, *day, by=day[1] + RESEND_S)
        out["delivered_pct_1000_bins" + tail] = round(pct, 2)
        out["readings_measured_1000_bins" + tail] = measured
        out["lost_collision_1000_bins" + tail] = fleet.channel.stats["lost_collision"]
        out["clock_error_s_p99" + tail] = clock_p(fleet, 0.99)
        out["clock_error_s_p50" + tail] = clock_p(fleet, 0.5)
        if answer:
            out["config_converged_pct" + tail] = round(converged["two_reports"], 1)
            out["config_converged_pct_end_of_day" + tail] = round(converged["end_of_day"], 1)
            radios = {r for _, _, r in fleet.gateway.sent}
            out["gateway_duty_cycle_max_pct" + tail] = round(100 * max(
                max_hour_share([s for s in fleet.gateway.sent if s[2] == r], *day) for r in radios), 3)
            out["downlinks_sent_1000_bins" + tail] = sum(1 for s in fleet.gateway.sent if day[0] <= s[0] < day[1])
            out["downlinks_skipped_duty_cycle_1000_bins" + tail] = fleet.gateway.skipped["duty_cycle"]
        if after == LATE_S:  # what a resend saves, given the time: the day's readings stored within two days
            out["delivered_pct_1000_bins" + tail + "_within_2_days"] = round(delivered_pct(fleet, *day)[0], 3)
            out["config_converged_pct_two_days" + tail] = round(converged["two_days"], 1)
        if not tail:
            out["bin_duty_cycle_max_pct"] = round(100 * max(max_hour_share(s, *day) for s in fleet.bin_tx.values()), 3)
            out["lost_half_duplex_1000_bins"] = fleet.channel.stats["lost_half_duplex"]
            out["downlink_pace_min_1000_bins"] = fleet.gateway.radios["radio0"].pace_min()
    fleet, _ = one_day(bins, seed, True, rtc="rc")
    out["clock_error_s_p99_rc"] = clock_p(fleet, 0.99)
    out["clock_error_s_p50_rc"] = clock_p(fleet, 0.5)
    out["delivered_pct_1000_bins_rc"] = round(delivered_pct(fleet, fleet.day0, fleet.day0 + DAY_S, by=fleet.day0 + DAY_S + RESEND_S)[0], 2)
    out["downlink_fleet_wall_s"] = round(time.perf_counter() - t_wall, 1)
    return out
