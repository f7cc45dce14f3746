"""Home Assistant discovery payloads: the fields Home Assistant's MQTT schema asks for, and the
value templates rendered (with Jinja2, as Home Assistant renders them) against real state and
event messages."""
import json

import jinja2
import pytest

from binlink.wire import codec
from binlink.gateway import homeassistant, integrate
from binlink.gateway.uplink import Reading
from binlink.gateway.config import ConfigError
from binlink.gateway.registry import Device

KEY = bytes(range(16))  # TEST KEY
BIN = Device(0xA1, "park-3", KEY, 1200, 200, "Park, east gate", 52.52, 13.405)
OTHER = Device(0xB2, "bin-b", KEY, 1000, 100)
# keys every discovered entity may carry, by component (Home Assistant MQTT integration docs)
COMMON = {"name", "unique_id", "default_entity_id", "device", "origin", "state_topic", "value_template", "expire_after",
          "json_attributes_topic", "json_attributes_template", "entity_category", "icon", "device_class"}
ALLOWED = {"sensor": COMMON | {"unit_of_measurement", "state_class"}, "binary_sensor": COMMON, "event": COMMON | {"event_types"}}


def configs(device=BIN, sw=None):
    return {t: json.loads(p) for t, p in homeassistant.messages("homeassistant", "binlink/city", "city", device, sw)}


def message(kind="state", flags=(), full_at=1_790_000_000.0, rate=24.5):
    """A state or event as the gateway publishes it: stored as a record, rendered by the publisher."""
    reading = Reading(fcnt=7, age_s=0, distance_mm=700, temperature_c=21, battery_mv=3650, flags=codec.flag_bits(flags),
                      valid_pings=5, pings=5, fill_pct=50.0)
    core = integrate.reading_core(BIN, reading, -90, 7.5, 1_789_990_000.0, True, False)
    tail = integrate.record_tail(BIN, "radio0", "gw1")
    if kind == "uplink":
        return integrate.render(integrate.uplink_record(core, tail)).decode()
    return integrate.render(integrate.record(kind, core, integrate.forecast_part(BIN, rate, full_at), tail)).decode()


def render(template, payload):
    env = jinja2.Environment()
    return env.from_string(template).render(value_json=json.loads(payload))


def test_every_entity_is_keyed_on_site_and_bin_and_uses_default_entity_id():
    cfgs = configs(sw="1.2.3")
    assert len(cfgs) == 6 + 4 + 1
    for topic, cfg in cfgs.items():
        _, component, node, entity, _ = topic.split("/")
        assert node == "binlink_city_park_3"
        assert cfg["unique_id"] == "binlink_city_park_3_%s" % entity
        assert cfg["default_entity_id"] == "%s.%s" % (component, cfg["unique_id"])
        assert "object_id" not in cfg and "availability_topic" not in cfg
        assert set(cfg) <= ALLOWED[component], set(cfg) - ALLOWED[component]
        assert cfg["device"] == {"identifiers": ["binlink_city_park_3"], "name": "Park, east gate", "manufacturer": "binlink",
                                 "model": "ultrasonic bin sensor", "serial_number": "0000a1", "sw_version": "1.2.3"}
        if component != "event":
            assert cfg["expire_after"] == 3 * 3600  # three missed hourly reports
    assert "sw_version" not in configs()["homeassistant/sensor/binlink_city_park_3/fill/config"]["device"]


def test_templates_render_the_state_as_home_assistant_would():
    cfgs = configs()
    s = message(flags=["fire", "low_battery"])
    sensor = lambda e: render(cfgs["homeassistant/sensor/binlink_city_park_3/%s/config" % e]["value_template"], s)
    binary = lambda e: render(cfgs["homeassistant/binary_sensor/binlink_city_park_3/%s/config" % e]["value_template"], s)
    assert sensor("fill") == "50.0" and sensor("fill_rate") == "24.5" and sensor("temperature") == "21"
    assert sensor("full_at") == "2026-09-21T14:13:20.000Z"
    assert [binary(a) for a in ("fire", "tilt", "sensor_fault", "low_battery")] == ["ON", "OFF", "OFF", "ON"]
    unknown = message(full_at=None, rate=None)
    full_at = cfgs["homeassistant/sensor/binlink_city_park_3/full_at/config"]
    assert full_at["device_class"] == "timestamp" and render(full_at["value_template"], unknown) == "None"
    fill = cfgs["homeassistant/sensor/binlink_city_park_3/fill/config"]
    attrs = json.loads(render(fill["json_attributes_template"], s))
    assert attrs == {"name": "Park, east gate", "latitude": 52.52, "longitude": 13.405}  # the map card reads these


def test_event_entity_fires_for_full_and_emptied_only():
    cfg = configs()["homeassistant/event/binlink_city_park_3/collection/config"]
    assert cfg["state_topic"] == "binlink/city/bin/park-3/event" and cfg["event_types"] == ["full", "emptied"]
    for name in ("full", "emptied"):
        payload = message(name)
        assert json.loads(render(cfg["value_template"], payload)) == {"event_type": name, "fill_pct": 50.0}
    for other in ("uplink", "fire"):
        payload = message(other)
        assert render(cfg["value_template"], payload) == "{}"  # Home Assistant ignores an empty JSON object


def test_report_interval_sets_expire_after():
    from binlink.gateway import registry

    devices = registry.parse({"device": [{"device_id": "a1", "bin_id": "quick", "key": KEY.hex(), "depth_mm": 1000,
                                          "full_mm": 100, "report_s": 900}]})
    cfg = json.loads(homeassistant.messages("ha", "b", "city", devices[0xA1])[0][1])
    assert cfg["expire_after"] == 2700  # three missed 15-minute reports
    with pytest.raises(ConfigError, match="report_s: must be 60 s to a week"):
        registry.parse({"device": [{"device_id": "a1", "bin_id": "q", "key": KEY.hex(), "depth_mm": 1000, "full_mm": 100,
                                    "report_s": 5}]})


def test_discovery_sends_only_changes_and_clears_retired_bins(tmp_path):
    path = str(tmp_path / "discovery.json")
    d = homeassistant.Discovery(path, "homeassistant", "binlink/city", "city")
    first = d.changes({1: BIN, 2: OTHER})
    assert len([p for _, p in first if p]) == 22
    # an upgrade clears the configs the old scheme (radio id, one "problem" sensor) left retained
    assert sorted(t for t, p in first if not p)[:2] == ["homeassistant/binary_sensor/binlink_0000a1_problem/problem/config",
                                                       "homeassistant/binary_sensor/binlink_0000b2_problem/problem/config"]
    assert len([p for _, p in first if not p]) == 10
    d.mark(first)
    d = homeassistant.Discovery(path, "homeassistant", "binlink/city", "city")  # after a restart
    assert d.changes({1: BIN, 2: OTHER}) == []
    assert len(d.changes({1: BIN, 2: OTHER}, force=True)) == 22  # Home Assistant restarted
    new_fw = d.changes({1: BIN, 2: OTHER}, firmware={"0000a1": "1.3.0"})
    assert len(new_fw) == 11 and all("park_3" in t and "1.3.0" in p for t, p in new_fw)
    retired = d.changes({1: BIN})
    assert len(retired) == 11 and all(p == "" and "bin_b" in t for t, p in retired)
    d.mark(retired)
    assert homeassistant.Discovery(path, "homeassistant", "binlink/city", "city").changes({1: BIN}) == []


@pytest.mark.parametrize("bin_id", ["bin-1", "a_b", "x9"])
def test_ids_are_valid_entity_ids(bin_id):
    for topic, payload in homeassistant.messages("homeassistant", "binlink/s-1", "s-1", Device(1, bin_id, KEY, 900, 100)):
        entity_id = json.loads(payload)["default_entity_id"]
        domain, object_id = entity_id.split(".")
        assert object_id.replace("_", "").isalnum() and object_id == object_id.lower()
