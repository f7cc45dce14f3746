"""Home Assistant discovery payloads: the fields Home Assistant's MQTT schema asks for (per entity
and device-based, `cmps`), the value templates rendered (with Jinja2, as Home Assistant renders
them) against real state, event, stats and plan messages; what is announced when (discovery.py)."""
import json

import jinja2
import pytest
from hypothesis import given, strategies as st

from binlink import __version__
from binlink.wire import codec
from binlink.gateway import discovery, homeassistant, integrate
from binlink.gateway.metrics import Metrics
from binlink.gateway.uplink import Reading, Reason
from binlink.gateway.config import ConfigError
from binlink.gateway.registry import Device

KEY = bytes(range(16))  # TEST KEY
BIN = Device(0xA1, "park-3", KEY, 1200, 200, "Park, east gate", 52.52, 13.405)
OTHER = Device(0xB2, "bin-b", KEY, 1000, 100)
GW = homeassistant.GatewayInfo("gw1", "city", "binlink/city", True, 60.0)
VIA = "binlink_city__gw_gw1"
# keys an entity may carry, by platform (Home Assistant MQTT integration docs: sensor, binary_sensor, event)
COMMON = {"name", "unique_id", "default_entity_id", "device", "origin", "state_topic", "value_template", "expire_after",
          "json_attributes_topic", "json_attributes_template", "entity_category", "icon", "device_class", "availability",
          "enabled_by_default"}
ALLOWED = {"sensor": COMMON | {"unit_of_measurement", "state_class"}, "binary_sensor": COMMON | {"payload_on", "payload_off"},
           "event": COMMON | {"event_types"}}
# device-based discovery: shared options at the root (Home Assistant MQTT docs, "Device discovery payload")
ROOT = {"dev", "device", "o", "origin", "cmps", "components", "availability", "state_topic", "command_topic", "qos", "encoding"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
DEVICE_KEYS = {"identifiers", "name", "manufacturer", "model", "serial_number", "sw_version", "via_device"}


def configs(device=BIN, sw=None, via=None):
    return {t: json.loads(p) for t, p in homeassistant.messages("homeassistant", "binlink/city", "city", device, sw, via)}


def device_config(device=BIN, sw=None, via=VIA):
    topic, payload = homeassistant.device_message("homeassistant", "binlink/city", "city", device, sw, via)
    return topic, json.loads(payload)


def message(kind="state", flags=(), full_at=1_790_000_000.0, rate=24.5, battery_mv=3650):
    """A state or event as the gateway publishes it: stored as a record, rendered by the publisher."""
    reading = Reading(fcnt=7, age_s=0, distance_mm=700, temperature_c=21, battery_mv=battery_mv, flags=codec.flag_bits(flags),
                      valid_pings=5, pings=5, fill_pct=50.0)
    core = integrate.reading_core(BIN, reading, -90, 7.5, 1_789_990_000.0, True, False)
    tail = integrate.record_tail(BIN, "radio0", "gw1")
    if kind == "uplink":
        return integrate.render(integrate.uplink_record(core, tail)).decode()
    return integrate.render(integrate.record(kind, core, integrate.forecast_part(BIN, rate, full_at), tail)).decode()


def render(template, payload):
    return jinja2.Environment().from_string(template).render(value_json=json.loads(payload))


# payloads ----------------------------------------------------------------------------------------

def test_every_entity_is_keyed_on_site_and_bin_and_uses_default_entity_id():
    cfgs = configs(sw="1.2.3", via=VIA)
    assert len(cfgs) == 8 + 4 + 1 + 1  # sensors, alarms, the collection event, settings pending
    for topic, cfg in cfgs.items():
        _, component, node, entity, _ = topic.split("/")
        assert node == "binlink_city_park_3"
        assert cfg["unique_id"] == "binlink_city_park_3_%s" % entity
        assert cfg["default_entity_id"] == "%s.%s" % (component, cfg["unique_id"])
        assert "object_id" not in cfg and "availability_topic" not in cfg and "availability" not in cfg
        assert set(cfg) <= ALLOWED[component], set(cfg) - ALLOWED[component]
        assert cfg["device"] == {"identifiers": ["binlink_city_park_3"], "name": "Park, east gate", "manufacturer": "binlink",
                                 "model": "ultrasonic bin sensor", "serial_number": "0000a1", "sw_version": "1.2.3",
                                 "via_device": VIA}
        assert cfg["origin"] == {"name": "binlink", "sw_version": __version__, "support_url": homeassistant.SUPPORT_URL}
        if component != "event" and entity != "settings_pending":  # settings change rarely: they never expire
            assert cfg["expire_after"] == 3 * 3600  # three missed hourly reports
    assert "sw_version" not in configs()["homeassistant/sensor/binlink_city_park_3/fill/config"]["device"]


def test_device_based_config_is_one_message_with_the_same_entities_under_cmps():
    topic, cfg = device_config(sw="1.2.3")
    assert topic == "homeassistant/device/binlink_city_park_3/config"
    assert set(cfg) <= ROOT and {"dev", "o", "cmps"} <= set(cfg)  # device and origin are required at the root
    assert set(cfg["o"]) == ORIGIN_KEYS and cfg["o"]["sw_version"] == __version__
    assert set(cfg["dev"]) <= DEVICE_KEYS and cfg["dev"]["via_device"] == VIA and cfg["dev"]["sw_version"] == "1.2.3"
    per_entity = {c["unique_id"]: c for c in configs(sw="1.2.3", via=VIA).values()}
    assert {c["unique_id"] for c in cfg["cmps"].values()} == set(per_entity)
    for entity, c in cfg["cmps"].items():
        assert c["p"] in ALLOWED and set(c) - {"p"} <= ALLOWED[c["p"]], set(c) - ALLOWED[c["p"]]
        assert "device" not in c and "origin" not in c  # said once, at the root
        same = dict(per_entity[c["unique_id"]])
        del same["device"], same["origin"]
        assert dict(c, p=None) == dict(same, p=None)  # the same entity either way: a mode switch keeps it
        assert c["default_entity_id"].startswith(c["p"] + ".")


def test_gateway_device_has_availability_diagnostics_and_the_collection_list():
    (topic, payload), = homeassistant.gateway_messages("homeassistant", GW, "device")
    cfg = json.loads(payload)
    assert topic == "homeassistant/device/%s/config" % VIA
    assert cfg["dev"]["identifiers"] == [VIA] and cfg["dev"]["sw_version"] == __version__
    cmps = cfg["cmps"]
    assert {"connected", "outbox_depth", "rejected", "shared_state", "collection_list"} <= set(cmps)
    assert {"rejected_" + r.value for r in Reason} <= set(cmps)
    status = "binlink/city/gateway/gw1/status"
    for entity, c in cmps.items():
        assert set(c) - {"p"} <= ALLOWED[c["p"]], (entity, set(c) - ALLOWED[c["p"]])
        if entity != "connected":  # unavailable while the gateway's status (or its last will) says offline
            assert c["availability"] == [{"topic": status, "payload_available": "online", "payload_not_available": "offline"}]
    assert cmps["connected"]["state_topic"] == status and "availability" not in cmps["connected"]
    assert (cmps["connected"]["payload_on"], cmps["connected"]["payload_off"]) == ("online", "offline")
    no_redis = json.loads(homeassistant.gateway_messages("homeassistant", GW._replace(shared_state=False), "device")[0][1])
    assert "shared_state" not in no_redis["cmps"]
    per_entity = homeassistant.gateway_messages("homeassistant", GW, "entity")
    assert len(per_entity) == len(cmps) and all(json.loads(p)["device"]["identifiers"] == [VIA] for _, p in per_entity)


def test_gateway_templates_render_its_real_stats_and_the_planner_list():
    m = Metrics()
    m.outbox_depth.set(12)
    m.rejected.labels("crc").inc(3)
    m.rejected.labels("replay").inc()
    stats = json.dumps(m.snapshot(), sort_keys=True)  # what publish_stats sends
    cmps = json.loads(homeassistant.gateway_messages("homeassistant", GW, "device")[0][1])["cmps"]
    assert render(cmps["outbox_depth"]["value_template"], stats) == "12"
    assert render(cmps["rejected"]["value_template"], stats) == "4"
    assert json.loads(render(cmps["rejected"]["json_attributes_template"], stats)) == {"crc": 3.0, "replay": 1.0}
    assert render(cmps["rejected_crc"]["value_template"], stats) == "3"
    assert render(cmps["rejected_bad_tag"]["value_template"], stats) == "0"
    fresh = json.dumps(Metrics().snapshot())  # nothing rejected yet: no label at all
    assert render(cmps["rejected"]["value_template"], fresh) == "0" and render(cmps["rejected_crc"]["value_template"], fresh) == "0"
    plan = json.dumps({"next_round": "2026-12-07T07:00:00.000Z", "horizon": "x", "bins_known": 3,
                       "bins": [{"bin_id": "park-3", "reason": "full"}, {"bin_id": "bin-b", "reason": "forecast"}]})
    cl = cmps["collection_list"]
    from binlink.gateway.planner import plan_topic

    assert cl["state_topic"] == cl["json_attributes_topic"] == plan_topic("binlink/city")  # where the planner publishes
    assert render(cl["value_template"], plan) == "2"
    assert json.loads(render(cl["json_attributes_template"], plan)) == {"next_round": "2026-12-07T07:00:00.000Z",
                                                                        "bins": ["park-3", "bin-b"]}
    shared = json.dumps({"gateway": "gw1", "state": "local", "since": "x"})
    assert render(cmps["shared_state"]["value_template"], shared) == "local"


def test_templates_render_the_state_as_home_assistant_would():
    cfgs = configs()
    s = message(flags=["fire", "low_battery"])
    sensor = lambda e: render(cfgs["homeassistant/sensor/binlink_city_park_3/%s/config" % e]["value_template"], s)
    binary = lambda e: render(cfgs["homeassistant/binary_sensor/binlink_city_park_3/%s/config" % e]["value_template"], s)
    assert sensor("fill") == "50.0" and sensor("fill_rate") == "24.5" and sensor("temperature") == "21"
    assert sensor("full_at") == "2026-09-21T14:13:20.000Z"
    assert sensor("last_seen") == json.loads(s)["received_at"] == "2026-09-21T11:26:40.000Z"
    assert cfgs["homeassistant/sensor/binlink_city_park_3/last_seen/config"]["device_class"] == "timestamp"
    assert sensor("battery_pct") == "100" and sensor("battery") == "3.65"
    assert [binary(a) for a in ("fire", "tilt", "sensor_fault", "low_battery")] == ["ON", "OFF", "OFF", "ON"]
    unknown = message(full_at=None, rate=None)
    full_at = cfgs["homeassistant/sensor/binlink_city_park_3/full_at/config"]
    assert full_at["device_class"] == "timestamp" and render(full_at["value_template"], unknown) == "None"
    fill = cfgs["homeassistant/sensor/binlink_city_park_3/fill/config"]
    attrs = json.loads(render(fill["json_attributes_template"], s))
    assert attrs == {"name": "Park, east gate", "latitude": 52.52, "longitude": 13.405}  # the map card reads these


@given(st.integers(min_value=2000, max_value=4550).map(lambda mv: mv - mv % 10))  # what the wire carries: 10 mV steps
def test_battery_percent_template_follows_the_documented_li_socl2_steps(mv):
    cfg = configs()["homeassistant/sensor/binlink_city_park_3/battery_pct/config"]
    assert cfg["device_class"] == "battery" and cfg["unit_of_measurement"] == "%"
    pct = homeassistant.battery_pct(mv / 1000)
    assert render(cfg["value_template"], message(battery_mv=mv)) == str(pct)
    assert pct in {100, 20, 10, 5, 0}  # coarse on purpose: the cell is flat until its knee


def test_battery_percent_steps():
    assert [homeassistant.battery_pct(v) for v in (3.67, 3.50, 3.49, 3.40, 3.35, 3.30, 3.2, 3.10, 3.0)] == \
        [100, 100, 20, 20, 10, 10, 5, 5, 0]
    assert homeassistant.battery_pct(None) is None


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


@pytest.mark.parametrize("bin_id", ["bin-1", "a_b", "x9"])
def test_ids_are_valid_entity_ids(bin_id):
    for topic, payload in homeassistant.messages("homeassistant", "binlink/s-1", "s-1", Device(1, bin_id, KEY, 900, 100)):
        entity_id = json.loads(payload)["default_entity_id"]
        domain, object_id = entity_id.split(".")
        assert object_id.replace("_", "").isalnum() and object_id == object_id.lower()


# what is announced when ---------------------------------------------------------------------------

def announce(path, bins, mode="device", firmware=None, force=False, gateway=GW, legacy=()):
    """One round as the publisher runs it, every message acknowledged: the (topic, payload) sent."""
    a = discovery.Announcer(discovery.Discovery(str(path), "homeassistant", "binlink/city", "city", mode, gateway))
    a.listen("homeassistant")
    for topic, payload in legacy:  # retained on the broker, delivered on subscribing
        a.retained(topic, payload)
    a.queue_changes(bins, firmware or {}, force=force)
    sent = []
    while a:
        for item in a.take(7):
            sent.append(item[:2])
            a.acknowledged(item)
        a.record()
    return sent


def test_a_restart_with_nothing_changed_publishes_nothing_and_a_change_costs_one_message(tmp_path):
    path = tmp_path / "discovery.json"
    bins = {i: homeassistant.BinInfo(i, "bin-%d" % i, "", None, None, 3600) for i in range(1, 101)}
    first = announce(path, bins)
    assert len(first) == 101 and all(t.startswith("homeassistant/device/") for t, _ in first)  # a bin each, the gateway
    assert announce(path, bins) == []  # a restart
    renamed = {**bins, 5: bins[5]._replace(name="Market square")}
    (changed,) = announce(path, renamed)
    assert changed[0] == "homeassistant/device/binlink_city_bin_5/config" and "Market square" in changed[1]
    (fw,) = announce(path, renamed, firmware={"000007": "1.3.0"})
    assert "binlink_city_bin_7" in fw[0] and json.loads(fw[1])["dev"]["sw_version"] == "1.3.0"
    assert len(announce(path, renamed, firmware={"000007": "1.3.0"}, force=True)) == 101  # Home Assistant restarted
    del renamed[9]
    assert announce(path, renamed, firmware={"000007": "1.3.0"}) == [("homeassistant/device/binlink_city_bin_9/config", "")]
    assert announce(path, renamed, firmware={"000007": "1.3.0"}) == []


def test_switching_mode_migrates_each_entity_as_home_assistant_documents(tmp_path):
    path = tmp_path / "discovery.json"
    bins = {1: homeassistant.BinInfo(1, "b1", "", None, None, 3600)}
    n = len(homeassistant.bin_entities("binlink/city", bins[1]))
    per_entity = announce(path, bins, mode="entity", gateway=None)
    assert len(per_entity) == n
    moved = announce(path, bins, mode="device", gateway=None)
    assert [p for _, p in moved[:n]] == ['{"migrate_discovery": true}'] * n  # entities and history kept
    assert moved[n][0] == "homeassistant/device/binlink_city_b1/config"
    assert moved[n + 1:] == [(t, "") for t, _ in per_entity]  # then the old topics cleared
    assert announce(path, bins, mode="device", gateway=None) == []
    back = announce(path, bins, mode="entity", gateway=None)
    assert back[0] == ("homeassistant/device/binlink_city_b1/config", '{"migrate_discovery": true}')
    assert back[-1] == ("homeassistant/device/binlink_city_b1/config", "") and len(back) == n + 2


def test_upgrade_from_the_per_entity_record_moves_to_device_discovery_once(tmp_path):
    path = tmp_path / "discovery.json"
    old = {t: "digest" for t, _ in homeassistant.messages("homeassistant", "binlink/city", "city", BIN)[:11]}
    path.write_text(json.dumps(old))  # 0.4's discovery.json: topic -> digest
    moved = announce(path, {1: BIN}, gateway=None)
    assert sum(p == discovery.MIGRATE for _, p in moved) == 11 and sum(p == "" for _, p in moved) == 11
    assert announce(path, {1: BIN}, gateway=None) == []


def test_old_scheme_configs_are_cleared_only_where_the_broker_still_retains_them(tmp_path):
    path = tmp_path / "discovery.json"
    fresh = announce(path, {1: BIN}, gateway=None)
    assert fresh == [(t, p) for t, p in fresh if p]  # a fresh install: nothing retained, nothing cleared
    path.unlink()
    old = "homeassistant/sensor/binlink_0000a1_fill/fill/config"
    sent = announce(path, {1: BIN}, gateway=None, legacy=[(old, b'{"name": "Fill"}'),
                                                          ("homeassistant/sensor/binlink_city_park_3/fill/config", b"{}")])
    clears = sorted(t for t, p in sent if p == "")
    assert clears == sorted("homeassistant/%s/binlink_0000a1_%s/%s/config" % (c, e, e) for c, e in discovery._LEGACY)
    assert json.loads(path.read_text())["legacy_checked"] is True
    own = discovery.Discovery(str(tmp_path / "other.json"), "homeassistant", "binlink/c0ffee", "c0ffee", "entity")
    assert own.legacy_clears("homeassistant/sensor/binlink_c0ffee_fill/fill/config", b"{}") == []  # its own bin "fill"
    a = discovery.Announcer(discovery.Discovery(str(path), "homeassistant", "binlink/city", "city"))
    assert a.listen("homeassistant") == []  # checked once, never subscribed to again


def test_configs_are_rendered_as_the_window_takes_them_and_requeued_when_a_session_ends(tmp_path):
    bins = {i: homeassistant.BinInfo(i, "bin-%d" % i, "", None, None, 3600) for i in range(1, 1001)}
    d = discovery.Discovery(str(tmp_path / "discovery.json"), "homeassistant", "binlink/city", "city", "device", None)
    rendered = []
    expand = d.expand
    d.expand = lambda job: rendered.append(job[0]) or expand(job)
    a = discovery.Announcer(d)
    a.queue_changes(bins, {})
    batch = a.take(10)
    assert len(rendered) == 10  # not 1,000 payloads in memory at once
    a.acknowledged(batch[0])
    a.session_lost(batch[1:])  # nine unacknowledged: sent again first
    assert [i[0] for i in a.take(9)] == [i[0] for i in batch[1:]]
    assert a.record() == [] and not d.nodes  # written once the round is over, not before


def test_a_hello_with_new_firmware_looks_at_its_bin_alone(tmp_path):
    path = tmp_path / "discovery.json"
    bins = {i: homeassistant.BinInfo(i, "bin-%d" % i, "", None, None, 3600) for i in range(1, 2001)}
    announce(path, bins)
    d = discovery.Discovery(str(path), "homeassistant", "binlink/city", "city", "device", GW)
    looked = []
    stale = d._stale
    d._stale = lambda node, digest: looked.append(node) or stale(node, digest)
    (job,) = d.changes(bins, {"000007": "1.3.0"}, only={"000007": "1.3.0"})
    assert looked == ["binlink_city_bin_7"] and job[0] == "binlink_city_bin_7"  # not 2,000 digests per hello
    assert d.changes(bins, {"000007": "1.3.0"}, only={"000008": "1.3.0"}) == []  # bin 8 runs what it announced


def test_settings_pending_shows_desired_against_reported():
    """Home Assistant shows whether a bin runs the settings the registry wants (issue 20): from the
    retained settings topic the gateway's downlink publishes, unknown until a 1.4.0 hello."""
    from binlink.gateway import downlink as gw_downlink
    from binlink.gateway import integrate
    kind, cfg = homeassistant.bin_entities("binlink/city", BIN)["settings_pending"]
    assert kind == "binary_sensor" and cfg["state_topic"] == integrate.settings_topic("binlink/city", BIN.bin_id)
    import dataclasses
    wants = dataclasses.replace(BIN, settings=(("report_s", 1800),))
    for reported, want in ((None, "None"), (("00000000", "1.4.0", 1.0), "ON"),
                           ((gw_downlink.registry_settings.desired_hash(wants), "1.4.0", 1.0), "OFF")):
        payload = gw_downlink.settings_payload(wants, reported)
        assert render(cfg["value_template"], payload) == want, (reported, payload)
        assert json.loads(render(cfg["json_attributes_template"], payload))["desired"]["report_s"] == 1800
