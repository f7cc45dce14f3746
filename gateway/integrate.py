"""MQTT messages for an accepted reading: retained bin state and the event stream.

Topic layout under the base topic (default binlink/<site>):
  bin/<bin_id>/state     retained JSON, the latest reading with the bin's forecast
                         (fill_rate_pct_per_day, full_at), position (lat, lon) and key_epoch
  bin/<bin_id>/event     one message per uplink (message_id "<device>:<epoch>:<fcnt>") and per alarm
                         ("<device>:<epoch>:<fcnt>:<event>"); consumers deduplicate across gateways
                         by it. <epoch> is the bin's key epoch: the counter starts again at 0 under
                         a new key, and the ids must not repeat the old key's
  gateway/<gw_id>/status retained "online" / "offline" (last will)
  gateway/<gw_id>/stats  periodic counters (JSON)
  gateway/<gw_id>/rejected  a frame from a known-looking device refused, and why (rate-limited):
                         what `binlink watch` shows a technician when a new bin's frames do not arrive"""
import struct
from datetime import datetime, timezone
from functools import lru_cache

import orjson

from binlink.wire import codec

PROBLEM_FLAGS = ("fire", "tilt", "sensor_fault", "low_battery")


_ISO = {}  # a group commit stamps all its messages with the same time: rendered once


def iso(ts):
    text = _ISO.get(ts)
    if text is None:
        if len(_ISO) >= 1024:
            _ISO.clear()
        text = _ISO[ts] = datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return text


def settings_topic(base, bin_id):
    """A bin's desired and reported settings (downlink.py), retained."""
    return "%s/bin/%s/settings" % (base, bin_id)


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


class Addresses:
    """Where a bin's readings go (its event and state topics) and the end of their records (bin,
    source, gateway): the same for most frames, built once."""

    def __init__(self, base, gateway_id):
        self.base, self.gateway_id = base, gateway_id
        self._tails = {}  # (bin_id, source) -> record tail
        self._topics = {}  # bin_id -> (event topic, state topic)

    def tail(self, device, source, bins):
        key = (device.bin_id, source)  # not the device: hashing a dataclass hashes every field
        tail = self._tails.get(key)
        if tail is None:
            if len(self._tails) > 4 * bins + 64:  # retired bins leave entries behind
                self._tails.clear()
            tail = self._tails[key] = record_tail(device, source, self.gateway_id)
        return tail

    def topics(self, device):
        topics = self._topics.get(device.bin_id)
        if topics is None:
            topics = self._topics[device.bin_id] = (event_topic(self.base, device.bin_id),
                                                    state_topic(self.base, device.bin_id))
        return topics


def rejection_message(base, gw_id, device_id, reason, source, rssi, now):
    """Not retained; its id is unique per device, reason and millisecond (never a reading's id)."""
    mid = "rejected:%06x:%s:%d" % (device_id, reason, int(now * 1000))
    body = {"event": "rejected", "message_id": mid, "device": "%06x" % device_id, "reason": reason,
            "source": source, "rssi": rssi, "gateway": gw_id, "received_at": iso(now)}
    return (mid, rejected_topic(base, gw_id), dumps(body), False)


# A reading's messages (its uplink event, alarm events and the bin's retained state) are stored in
# the outbox as fixed binary records and rendered to JSON by the publisher process (render()):
# ingest is the busiest core, and a record is one struct.pack where the JSON, then deflated for
# the SD card, cost it ~25 us a frame. Layout, after the prefix byte and the kind byte:
#   CORE: device id, key epoch, fcnt, fill %, distance mm, temperature C, battery mV, flag bits,
#         pings (valid << 4 | sent), rssi dBm, snr dB, received at, age s, marks (time synced, backlog)
#   states and alarms only: FORECAST (rate %/day, full at, lat, lon), then the bin's name
#   bin id, source, gateway
# Strings are a 16-bit length and UTF-8; a missing value is NaN (floats) or the type's minimum.
# NEVER change this layout or KINDS' order: stored rows could not be read back. A new layout takes
# a new prefix byte (outbox.py's deflated JSON rows use 0x00 and 0x01).
RECORD = b"\x02"
KINDS = ("state", "uplink", "emptied", "full", "fire", "tilt", "sensor_fault", "low_battery")
_KIND_BYTES = {k: RECORD + bytes([i]) for i, k in enumerate(KINDS)}
_CORE = struct.Struct("<IIIdHbHBBhddIB")
_FORECAST = struct.Struct("<dddd")
_LEN = struct.Struct("<H")
_NAN = float("nan")
_NO_U16, _NO_I8, _NO_I16 = 0xFFFF, -128, -32768
_SYNCED, _BACKLOG = 1, 2
_PROBLEM_BITS = codec.flag_bits(PROBLEM_FLAGS)


@lru_cache(maxsize=4096)  # bin ids, sources, the gateway id, names: a few per bin
def _text(s):
    b = s.encode()
    return _LEN.pack(len(b)) + b


def _opt(v, missing):
    return missing if v is None else v


def reading_core(device, reading, rssi, snr, received_at, time_synced, backlog):
    """The part of a reading's records its messages share (the uplink event, alarms, the state).
    reading: an uplink.Reading."""
    return _CORE.pack(device.device_id, device.key_epoch, reading.fcnt, _opt(reading.fill_pct, _NAN),
                      _opt(reading.distance_mm, _NO_U16), _opt(reading.temperature_c, _NO_I8), reading.battery_mv,
                      reading.flags, reading.valid_pings << 4 | reading.pings, _opt(rssi, _NO_I16), _opt(snr, _NAN),
                      received_at, reading.age_s, (_SYNCED if time_synced else 0) | (_BACKLOG if backlog else 0))


def record_tail(device, source, gateway):
    return _text(device.bin_id) + _text(source) + _text(gateway)


def uplink_record(core, tail):
    return _KIND_BYTES["uplink"] + core + tail


def forecast_part(device, rate_pct_per_day, full_at):
    """A state's and an alarm's extra: the bin's forecast (IPSO 3435-style) and its position and name."""
    return _FORECAST.pack(_opt(rate_pct_per_day, _NAN), _NAN if full_at is None else round(full_at),
                          _opt(device.lat, _NAN), _opt(device.lon, _NAN)) + _text(device.name)


def record(kind, core, forecast, tail):
    """A state (kind "state") or an alarm event's record."""
    return _KIND_BYTES[kind] + core + forecast + tail


def _none_if_nan(v):
    return None if v != v else v


def _strings(text):
    """The length-prefixed strings a record ends with."""
    out, p = [], 0
    while p < len(text):
        size = _LEN.unpack_from(text, p)[0]
        out.append(text[p + 2:p + 2 + size].decode())
        p += 2 + size
    return out


_ENDS = {}  # a record's strings as stored -> as strings: the same few per bin, parsed once


@lru_cache(maxsize=512)  # the codec's 256 battery steps
def _volts(mv):
    return round(mv / 1000.0, 2)


_FLAG_LISTS = tuple(tuple(codec.flag_names(bits)) for bits in range(256))


def render(blob):
    """The JSON a record stands for (sorted keys, as every message of the gateway)."""
    kind = KINDS[blob[1]]
    (device_id, epoch, fcnt, fill, distance, temperature, battery_mv, bits, pings, rssi, snr, received_at, age_s,
     marks) = _CORE.unpack_from(blob, 2)
    p = 2 + _CORE.size
    if kind != "uplink":
        rate, full_at, lat, lon = _FORECAST.unpack_from(blob, p)
        p += _FORECAST.size
    end = blob[p:]
    strings = _ENDS.get(end)
    if strings is None:
        if len(_ENDS) >= 4096:
            _ENDS.clear()
        strings = _ENDS[end] = _strings(end)
    body = {
        "device": "%06x" % device_id, "fcnt": fcnt, "fill_pct": _none_if_nan(fill),
        "distance_mm": None if distance == _NO_U16 else distance,
        "temperature_c": None if temperature == _NO_I8 else temperature,
        "battery_v": _volts(battery_mv), "flags": _FLAG_LISTS[bits], "problem": bool(bits & _PROBLEM_BITS),
        "valid_pings": pings >> 4, "pings": pings & 0x0F, "rssi": None if rssi == _NO_I16 else rssi,
        "snr": _none_if_nan(snr), "received_at": iso(received_at),
        "measured_at": iso(received_at - age_s), "time_synced": bool(marks & _SYNCED),
        "bin_id": strings[-3], "source": strings[-2], "gateway": strings[-1],
    }
    if kind != "uplink":
        body.update(fill_rate_pct_per_day=_none_if_nan(rate), full_at=None if full_at != full_at else iso(full_at),
                    lat=_none_if_nan(lat), lon=_none_if_nan(lon), name=strings[0] or None)
    if kind == "state":
        body["key_epoch"] = epoch  # the key fcnt counts under: recovery takes a counter only for the same key
    else:
        mid = "%06x:%d:%d" % (device_id, epoch, fcnt)
        body.update(event=kind, message_id=mid if kind == "uplink" else "%s:%s" % (mid, kind),
                    backlog=bool(marks & _BACKLOG))
    return dumps(body)


def state_of(stored):
    """(fill %, flag bits) of a stored state record — what a bin's next reading is compared with —
    or (None, None) when the row cannot be read (damaged, or not a record)."""
    try:
        if stored[:1] != RECORD or KINDS[stored[1]] != "state":
            return None, None
        fields = _CORE.unpack_from(stored, 2)
    except (IndexError, TypeError, struct.error):
        return None, None
    return _none_if_nan(fields[3]), fields[7]


def dumps(obj):
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def message_id(device, fcnt, event="uplink"):
    mid = "%s:%d" % (device.message_prefix, fcnt)
    return mid if event == "uplink" else "%s:%s" % (mid, event)


def hello_message(base, device, fcnt, hello, rx):
    """hello: (firmware version, reset cause, config hash) as codec.hello_fields gives them."""
    mid = message_id(device, fcnt)
    fw_version, reset_cause, config_hash = hello
    body = {
        "event": "hello", "message_id": mid, "device": device.dev, "bin_id": device.bin_id, "fcnt": fcnt,
        "fw_version": fw_version, "reset_cause": reset_cause, "config_hash": config_hash,
        "rssi": rx["rssi"], "snr": rx["snr"], "gateway": rx["gateway"], "source": rx["source"],
        "received_at": iso(rx["received_at"]), "time_synced": rx["time_synced"],
    }
    return (mid, event_topic(base, device.bin_id), dumps(body), False)
