"""A reading's messages are stored as binary records and rendered to JSON by the publisher: what
renders must be exactly the message the topic layout documents (integrate.py), for any reading."""
import json
from datetime import datetime, timezone

from hypothesis import given, strategies as st

from binlink.wire import codec
from binlink.gateway import integrate, payloads as outbox
from binlink.gateway.registry import Device
from binlink.gateway.uplink import Reading

KEY = bytes(range(16))  # TEST KEY
FLAG_NAMES = [name for _, name in codec.FLAG_NAMES]
READING = Reading(fcnt=7, age_s=0, distance_mm=700, temperature_c=21, battery_mv=3650, flags=0, valid_pings=5, pings=5,
                  fill_pct=50.0)


def _iso(ts):
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def expected(kind, device, reading, flags, fill, fcnt, rssi, snr, gateway, source, received_at, age_s, synced, backlog,
             rate, full_at):
    """The message as documented, built field by field (the JSON the gateway published before records)."""
    body = {
        "device": "%06x" % device.device_id, "bin_id": device.bin_id, "fcnt": fcnt, "fill_pct": fill,
        "distance_mm": reading["distance_mm"], "temperature_c": reading["temperature_c"],
        "battery_v": round(reading["battery_mv"] / 1000.0, 2), "flags": flags,
        "problem": any(f in flags for f in ("fire", "tilt", "sensor_fault", "low_battery")),
        "valid_pings": reading["valid_pings"], "pings": reading["pings"], "rssi": rssi, "snr": snr, "gateway": gateway,
        "source": source, "received_at": _iso(received_at), "measured_at": _iso(received_at - age_s), "time_synced": synced,
    }
    if kind != "uplink":
        body.update(fill_rate_pct_per_day=rate, full_at=None if full_at is None else _iso(round(full_at)),
                    lat=device.lat, lon=device.lon, name=device.name or None)
    if kind == "state":
        body["key_epoch"] = device.key_epoch
    else:
        mid = "%06x:%d:%d" % (device.device_id, device.key_epoch, fcnt)
        body.update(event=kind, message_id=mid if kind == "uplink" else mid + ":" + kind, backlog=backlog)
    return body


texts = st.text(min_size=1, max_size=40)
maybe_float = st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False))


@given(kind=st.sampled_from(integrate.KINDS),
       device=st.builds(Device, st.integers(0, 0xFFFFFF), texts, st.just(KEY), st.just(1200), st.just(200),
                        st.one_of(st.just(""), texts), st.one_of(st.none(), st.floats(-90, 90)),
                        st.one_of(st.none(), st.floats(-180, 180)), st.integers(0, 2**32 - 1)),
       distance=st.one_of(st.none(), st.integers(0, 0xFFFE)), temperature=st.one_of(st.none(), st.integers(-127, 127)),
       battery=st.integers(0, 255), flags=st.sets(st.sampled_from(FLAG_NAMES)), valid=st.integers(0, 15),
       pings=st.integers(0, 15), fill=st.one_of(st.none(), st.floats(0, 100).map(lambda v: round(v, 1))),
       fcnt=st.integers(0, 2**32 - 1), rssi=st.one_of(st.none(), st.integers(-200, 50)), snr=maybe_float,
       gateway=texts, source=texts, received_at=st.floats(1.6e9, 2.5e9), age_s=st.integers(0, 255 * 60 * 255),
       synced=st.booleans(), backlog=st.booleans(), rate=maybe_float,
       full_at=st.one_of(st.none(), st.floats(1.6e9, 2.5e9)))
def test_a_stored_record_renders_the_documented_message(kind, device, distance, temperature, battery, flags, valid, pings,
                                                        fill, fcnt, rssi, snr, gateway, source, received_at, age_s,
                                                        synced, backlog, rate, full_at):
    names = [n for n in FLAG_NAMES if n in flags]  # the order the codec lists them in
    reading = {"distance_mm": distance, "temperature_c": temperature, "battery_mv": 2000 + 10 * battery, "flags": names,
               "valid_pings": valid, "pings": pings}
    core = integrate.reading_core(device, Reading(fcnt, age_s, distance, temperature, 2000 + 10 * battery,
                                                  codec.flag_bits(names), valid, pings, fill), rssi, snr, received_at,
                                  synced, backlog)
    tail = integrate.record_tail(device, source, gateway)
    if kind == "uplink":
        stored = integrate.uplink_record(core, tail)
    else:
        stored = integrate.record(kind, core, integrate.forecast_part(device, rate, full_at), tail)
    want = expected(kind, device, reading, names, fill, fcnt, rssi, snr, gateway, source, received_at, age_s, synced,
                    backlog, rate, full_at)
    published = outbox.unpack(outbox.pack(stored))  # as the outbox stores it and the publisher reads it back
    assert json.loads(published) == want
    assert list(json.loads(published)) == sorted(want)  # keys sorted, as every message of the gateway


def test_a_record_is_smaller_than_its_deflated_json():
    device = Device(0xA1, "park-3", KEY, 1200, 200, "Park, east gate", 52.52, 13.405)
    core = integrate.reading_core(device, READING, -90, None, 1_789_990_000.0, True, False)
    tail = integrate.record_tail(device, "radio0", "gw1")
    for stored in (integrate.uplink_record(core, tail),
                   integrate.record("state", core, integrate.forecast_part(device, 24.5, 1_790_000_000.0), tail)):
        assert len(stored) < len(outbox.pack(integrate.render(stored)))


@given(name=st.text(max_size=300), epoch=st.integers(0, 2**40), lat=st.one_of(st.integers(-2**70, 2**70), st.floats()),
       rssi=st.integers(-10**6, 10**6), snr=st.floats())
def test_whatever_the_registry_and_a_module_accept_can_be_stored(name, epoch, lat, rssi, snr):
    """The registry and the module formats bound what a record holds: a bin they accept never
    makes ingest raise (a crash per frame of that bin) when its reading is stored."""
    from binlink.gateway import module_formats, registry
    from binlink.gateway.config import ConfigError

    entry = {"device_id": "a1", "bin_id": "park-3", "key": KEY.hex(), "depth_mm": 1200, "full_mm": 200, "name": name,
             "key_epoch": epoch, "lat": lat}
    try:
        device = registry.parse({"device": [entry]})[0xA1]
    except ConfigError:
        return
    line = ("+RCV=1,4,ABCD,%d,%r\r\n" % (rssi, snr)).encode()
    rec = module_formats.make("rylr998").feed(line)[0]
    if rec.frame is None:
        return
    core = integrate.reading_core(device, READING, rec.rssi, rec.snr, 1_789_990_000.0, True, False)
    stored = integrate.record("state", core, integrate.forecast_part(device, 1.0, None), integrate.record_tail(device, "r", "g"))
    assert json.loads(integrate.render(stored))["name"] == (name or None)
