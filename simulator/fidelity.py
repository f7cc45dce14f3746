"""What reached MQTT against the simulator's ground truth."""

DETECTABLE_LEVEL = 0.25  # a pickup from a bin under 25 % full is too small a drop to call a pickup
SETTLE_S = 3600  # pickups in the last hour of a run may not have been reported yet


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
        "false_alarms": false_alarms,
    }
