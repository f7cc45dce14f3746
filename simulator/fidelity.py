"""What reached MQTT against the simulator's ground truth: misses (recall) and false reports
(precision), for pickups (`emptied`) and `full` events alike."""

DETECTABLE_LEVEL = 0.25  # a pickup from a bin under 25 % full is too small a drop to call a pickup
SETTLE_S = 3600  # pickups in the last hour of a run may not have been reported yet
EMPTIED_MATCH_S = 6 * 3600  # an `emptied` event is true when the bin was collected this long before it at most
FULL_TRUE_PCT = 75.0  # a `full` event is false when the bin was truly under this (event threshold 90 %)


def score(truth, devices, events, end_time):
    """truth: fleet.truth; devices: {device hex: bin_id}; events: decoded event messages.

    Returns fill_mae_pct, pickup_recall, false_alarms and the counts behind them."""
    errors = []
    measured_at = {}
    for e in events:
        if e["event"] != "uplink":
            continue
        t = truth.readings.get((e["device"], e["fcnt"]))
        if t is None:
            continue
        measured_at[(e["device"], e["fcnt"])] = t[2]
        if e["fill_pct"] is not None:
            errors.append(abs(e["fill_pct"] - min(100.0, t[0])))
    emptied = {}
    for e in events:
        if e["event"] == "emptied" and (e["device"], e["fcnt"]) in truth.readings:
            emptied.setdefault(e["bin_id"], []).append(truth.readings[(e["device"], e["fcnt"])][2])
    by_bin = {}
    for bin_id, t, level in truth.collections:
        by_bin.setdefault(bin_id, []).append((t, level))
    found = counted = 0
    for bin_id, cols in by_bin.items():
        cols.sort()
        for i, (t, level) in enumerate(cols):
            if level < DETECTABLE_LEVEL or t > end_time - SETTLE_S:
                continue
            counted += 1
            until = cols[i + 1][0] if i + 1 < len(cols) else end_time
            if any(t <= m <= until for m in emptied.get(bin_id, [])):
                found += 1
    true_emptied, spurious_emptied = _match_emptied(emptied, by_bin)
    full_stats = _full_events(truth, events)
    false_alarms = 0
    for e in events:
        if e["event"] in ("fire", "tilt"):
            t = truth.readings.get((e["device"], e["fcnt"]))
            if t is None or not truth.alarm_active(e["bin_id"], e["event"], t[2]):
                false_alarms += 1
    return {
        "fill_mae_pct": round(sum(errors) / len(errors), 2) if errors else None,
        "readings_compared": len(errors),
        "pickup_recall": round(found / counted, 4) if counted else None,
        "pickups_detectable": counted,
        "pickups_total": len(truth.collections),
        "pickup_precision": round(true_emptied / (true_emptied + spurious_emptied), 4) if true_emptied + spurious_emptied else None,
        "emptied_spurious": spurious_emptied,
        **full_stats,
        "false_alarms": false_alarms,
    }


def _match_emptied(emptied, collections_by_bin):
    """(true, spurious) emptied events: each collection explains at most one event after it."""
    true = spurious = 0
    for bin_id, times in emptied.items():
        free = sorted(t for t, _ in collections_by_bin.get(bin_id, []))
        for m in sorted(times):
            hit = next((c for c in free if m - EMPTIED_MATCH_S <= c <= m), None)
            if hit is None:
                spurious += 1
            else:
                free.remove(hit)
                true += 1
    return true, spurious


def _full_events(truth, events, full_pct=90.0):
    """Precision: `full` events from a bin truly near full. Recall: true rises through full_pct
    (between two of the bin's readings) with a `full` event in the same fill cycle (from the bin's
    last reading under full_pct - 20 to its next)."""
    series = {}
    for (dev, fcnt), (fill, _, t) in truth.readings.items():
        series.setdefault(dev, []).append((t, fill))
    fulls = {}
    good = bad = 0
    for e in events:
        if e["event"] != "full":
            continue
        t = truth.readings.get((e["device"], e["fcnt"]))
        if t is None:
            continue
        fulls.setdefault(e["device"], []).append(t[2])
        if t[0] >= FULL_TRUE_PCT:
            good += 1
        else:
            bad += 1
    rises = found = 0
    for dev, pts in series.items():
        pts.sort()
        for i in range(1, len(pts)):
            if pts[i - 1][1] < full_pct <= pts[i][1]:
                rises += 1
                # the fill cycle around the rise: a calibration that reads high calls it early
                since = next((t for t, f in reversed(pts[:i]) if f < full_pct - 20), float("-inf"))
                until = next((t for t, f in pts[i:] if f < full_pct - 20), float("inf"))
                if any(since < m <= until for m in fulls.get(dev, [])):
                    found += 1
    return {"full_precision": round(good / (good + bad), 4) if good + bad else None, "full_spurious": bad,
            "full_recall": round(found / rises, 4) if rises else None, "full_rises": rises}
