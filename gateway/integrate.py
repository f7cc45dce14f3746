"""MQTT messages for an accepted reading: retained bin state and the event stream.

Topic layout under the base topic (default binlink/<site>):
  bin/<bin_id>/state     retained JSON, the latest reading with the bin's forecast
                         (fill_rate_pct_per_day, full_at) and position (lat, lon)
  bin/<bin_id>/event     one message per uplink (message_id "<device>:<epoch>:<fcnt>") and per alarm
                         ("<device>:<epoch>:<fcnt>:<event>"); consumers deduplicate across gateways
                         by it. <epoch> is the bin's key epoch: the counter starts again at 0 under
                         a new key, and the ids must not repeat the old key's
  gateway/<gw_id>/status retained "online" / "offline" (last will)
  gateway/<gw_id>/stats  periodic counters (JSON)
  gateway/<gw_id>/rejected  a frame from a known-looking device refused, and why (rate-limited):
                         what `binlink watch` shows a technician when a new bin's frames do not arrive"""
from datetime import datetime, timezone
from functools import lru_cache

import orjson

PROBLEM_FLAGS = ("fire", "tilt", "sensor_fault", "low_battery")


@lru_cache(maxsize=256)  # one group commit stamps all its messages with the same time
def iso(ts):
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def state_topic(base, bin_id):
    return "%s/bin/%s/state" % (base, bin_id)


def event_topic(base, bin_id):
    return "%s/bin/%s/event" % (base, bin_id)


def status_topic(base, gw_id):
    return "%s/gateway/%s/status" % (base, gw_id)


def stats_topic(base, gw_id):
    return "%s/gateway/%s/stats" % (base, gw_id)


def rejected_topic(base, gw_id):
    return "%s/gateway/%s/rejected" % (base, gw_id)


def rejection_message(base, gw_id, device_id, reason, source, rssi, now):
    """Not retained; its id is unique per device, reason and millisecond (never a reading's id)."""
    mid = "rejected:%06x:%s:%d" % (device_id, reason, int(now * 1000))
    body = {"event": "rejected", "message_id": mid, "device": "%06x" % device_id, "reason": reason,
            "source": source, "rssi": rssi, "gateway": gw_id, "received_at": iso(now)}
    return (mid, rejected_topic(base, gw_id), dumps(body), False)


def reading_fields(device, reading, fill, fcnt, rx, measured_at):
    """The fields state and uplink events share. rx: dict(gateway, source, rssi, snr, received_at, time_synced)."""
    flags = reading["flags"]
    return {
        "device": device.dev,
        "bin_id": device.bin_id,
        "fcnt": fcnt,
        "fill_pct": fill,
        "distance_mm": reading["distance_mm"],
        "temperature_c": reading["temperature_c"],
        "battery_v": round(reading["battery_mv"] / 1000.0, 2),
        "flags": flags,
        "problem": any(f in flags for f in PROBLEM_FLAGS),
        "valid_pings": reading["valid_pings"],
        "pings": reading["pings"],
        "rssi": rx["rssi"],
        "snr": rx["snr"],
        "gateway": rx["gateway"],
        "source": rx["source"],
        "received_at": iso(rx["received_at"]),
        "measured_at": iso(measured_at),
        "time_synced": rx["time_synced"],
    }


def with_forecast(fields, device, rate_pct_per_day, full_at):
    """State fields of a reading plus the bin's forecast (IPSO 3435-style) and its position."""
    return dict(fields, fill_rate_pct_per_day=rate_pct_per_day, full_at=None if full_at is None else iso(round(full_at)),
                lat=device.lat, lon=device.lon, name=device.name or None)


def dumps(obj):
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def state_message(base, device, fields):
    """Retained state; the outbox publishes only a bin's newest pending one (conflation)."""
    return ("%s:state" % message_id(device, fields["fcnt"]), state_topic(base, device.bin_id), dumps(fields), True)


def message_id(device, fcnt, event="uplink"):
    mid = "%s:%d" % (device.message_prefix, fcnt)
    return mid if event == "uplink" else "%s:%s" % (mid, event)


def event_message(base, device, fields, event, backlog=False):
    mid = message_id(device, fields["fcnt"], event)
    body = dict(fields, event=event, message_id=mid, backlog=backlog)
    return (mid, event_topic(base, device.bin_id), dumps(body), False)


def hello_message(base, device, hello, rx):
    mid = message_id(device, hello["fcnt"])
    body = {
        "event": "hello", "message_id": mid, "device": device.dev, "bin_id": device.bin_id, "fcnt": hello["fcnt"],
        "fw_version": hello["fw_version"], "reset_cause": hello["reset_cause"], "config_hash": hello["config_hash"],
        "rssi": rx["rssi"], "snr": rx["snr"], "gateway": rx["gateway"], "source": rx["source"],
        "received_at": iso(rx["received_at"]), "time_synced": rx["time_synced"],
    }
    return (mid, event_topic(base, device.bin_id), dumps(body), False)
