"""Home Assistant MQTT discovery payloads: a device per bin, a device for the gateway.

Ids are keyed on site and bin id (binlink_<site>_<bin_id>_<entity>), not on the radio device id,
so a bin keeps its entities through a re-flash or a new sensor board, and two sites never collide.
A bin's entities take no availability from a gateway (with several gateways none of them speaks
for a bin); each expires instead when its bin has been silent for EXPIRE_REPORTS report intervals.
The gateway is a device of its own (binlink_<site>__gw_<id>), available while its status topic
says `online` (its last will says `offline`), with diagnostics read from its stats topic; bins
name it as their `via_device`.

Two shapes of the same entities (`[mqtt] discovery_mode`):
- "device" (Home Assistant 2024.12 and later): one retained config per device at
  <prefix>/device/<node>/config, the entities under `cmps`, each with its platform `p`;
- "entity": one retained config per entity at <prefix>/<component>/<node>/<entity>/config.
What is announced and when is gateway/discovery.py."""
import json
from typing import NamedTuple

from binlink import __version__
from binlink.gateway import integrate
from binlink.gateway.uplink import Reason

EXPIRE_REPORTS = 3  # a bin is unavailable after missing this many reports in a row
SUPPORT_URL = "https://github.com/binlink/binlink"  # the project's home: a fork points it at its own
ORIGIN = {"name": "binlink", "sw_version": __version__, "support_url": SUPPORT_URL}

# Li-SOCl2 (the bins' cell, simulator/parts/cell.py): flat at ~3.6 V under load for most of its
# life, then a knee over the last few per cent. The voltage alone says "on the plateau" or "past
# the knee", not how much is left: 100 % means anything from new to nearly at the knee.
# (volts at least, per cent), highest first; below the last step 0 %.
BATTERY_STEPS = ((3.50, 100), (3.40, 20), (3.30, 10), (3.10, 5))


def battery_pct(volts):
    """The Battery (%) entity's value for a cell voltage (the template below does the same)."""
    if volts is None:
        return None
    return next((pct for v, pct in BATTERY_STEPS if volts >= v), 0)


_BATTERY_TEMPLATE = ("{% set v = value_json.battery_v %}{% if v is none %}None" +
                     "".join("{%% elif v >= %.2f %%}%d" % step for step in BATTERY_STEPS) + "{% else %}0{% endif %}")

# (entity, name, value template, extra config); the value template reads the bin's retained state
SENSORS = (
    ("fill", "Fill level", "{{ value_json.fill_pct }}",
     {"unit_of_measurement": "%", "state_class": "measurement", "icon": "mdi:delete"}),
    ("full_at", "Full at", "{{ value_json.full_at if value_json.full_at else 'None' }}", {"device_class": "timestamp"}),
    ("fill_rate", "Fill rate", "{{ value_json.fill_rate_pct_per_day if value_json.fill_rate_pct_per_day is not none else 'None' }}",
     {"unit_of_measurement": "%/d", "state_class": "measurement", "icon": "mdi:trending-up"}),
    ("temperature", "Temperature", "{{ value_json.temperature_c }}",
     {"unit_of_measurement": "°C", "device_class": "temperature", "state_class": "measurement"}),
    ("battery_pct", "Battery", _BATTERY_TEMPLATE,
     {"unit_of_measurement": "%", "device_class": "battery", "state_class": "measurement", "entity_category": "diagnostic"}),
    ("battery", "Battery voltage", "{{ value_json.battery_v }}",
     {"unit_of_measurement": "V", "device_class": "voltage", "state_class": "measurement", "entity_category": "diagnostic"}),
    ("rssi", "Signal strength", "{{ value_json.rssi }}",
     {"unit_of_measurement": "dBm", "device_class": "signal_strength", "state_class": "measurement", "entity_category": "diagnostic"}),
    ("last_seen", "Last seen", "{{ value_json.received_at }}", {"device_class": "timestamp", "entity_category": "diagnostic"}),
)
# one binary sensor per alarm flag: (entity, flag, name, device class)
ALARMS = (
    ("fire", "fire", "Fire", "heat"),
    ("tilt", "tilt", "Tilted", "problem"),
    ("sensor_fault", "sensor_fault", "Sensor fault", "problem"),
    ("low_battery", "low_battery", "Battery low", "battery"),
)
EVENT_TYPES = ("full", "emptied")
# the map card reads latitude/longitude attributes
ATTRIBUTES = '{{ {"name": value_json.name, "latitude": value_json.lat, "longitude": value_json.lon} | tojson }}'


class BinInfo(NamedTuple):
    """What discovery needs of a registry device, and nothing secret: the publisher process is sent
    these, never the devices (they carry keys)."""
    device_id: int
    bin_id: str
    name: str
    lat: float | None
    lon: float | None
    report_s: int

    @property
    def dev(self):
        return "%06x" % self.device_id


def bin_infos(devices):
    """{device id: BinInfo} for registry devices."""
    return {k: BinInfo(d.device_id, d.bin_id, d.name, d.lat, d.lon, d.report_s) for k, d in devices.items()}


class GatewayInfo(NamedTuple):
    """What the gateway's own device needs: from the config."""
    gateway_id: str
    site: str
    base: str
    shared_state: bool  # [redis] on: the shared-state entity is announced
    stats_interval_s: float

    @classmethod
    def of(cls, cfg):
        return cls(cfg.gateway_id, cfg.site, cfg.base_topic, cfg.redis.enabled, cfg.status_interval_s)


def _slug(text):
    return "".join(c if c.isalnum() else "_" for c in text.lower())


def uid_prefix(site, bin_id):
    return "binlink_%s_%s" % (_slug(site), _slug(bin_id))


def gateway_node(site, gateway_id):
    """A bin id starts with a letter or digit, so `__` never appears where a bin's node has its id."""
    return "binlink_%s__gw_%s" % (_slug(site), _slug(gateway_id))


# one device's entities: {entity: (component, config without device and origin)} --------------------

def bin_entities(base, device):
    state = integrate.state_topic(base, device.bin_id)
    expire = EXPIRE_REPORTS * device.report_s
    out = {}
    for entity, name, template, extra in SENSORS:
        cfg = dict(name=name, state_topic=state, value_template=template, expire_after=expire, **extra)
        if entity == "fill":
            cfg.update(json_attributes_topic=state, json_attributes_template=ATTRIBUTES)
        out[entity] = ("sensor", cfg)
    for entity, flag, name, device_class in ALARMS:
        out[entity] = ("binary_sensor", {
            "name": name, "device_class": device_class, "expire_after": expire, "state_topic": state,
            "value_template": "{{ 'ON' if '%s' in value_json.flags else 'OFF' }}" % flag,
        })
    settings = integrate.settings_topic(base, device.bin_id)
    out["settings_pending"] = ("binary_sensor", {  # the gateway's downlink.py publishes it; unknown before a 1.4.0 hello
        "name": "Settings pending", "device_class": "problem", "entity_category": "diagnostic", "state_topic": settings,
        "value_template": "{{ 'None' if value_json.in_sync is none else ('OFF' if value_json.in_sync else 'ON') }}",
        "json_attributes_topic": settings,
        "json_attributes_template": "{{ {'desired': value_json.desired, 'desired_hash': value_json.desired_hash, "
                                    "'reported_hash': value_json.reported_hash} | tojson }}",
    })
    out["collection"] = ("event", {
        "name": "Collection", "state_topic": integrate.event_topic(base, device.bin_id), "event_types": list(EVENT_TYPES),
        # other events on the topic render to {} and Home Assistant ignores them
        "value_template": "{%% if value_json.event in %s %%}{{ {'event_type': value_json.event, 'fill_pct': value_json.fill_pct} "
                          "| tojson }}{%% else %%}{}{%% endif %%}" % json.dumps(list(EVENT_TYPES)),
    })
    return out


def gateway_entities(gw):
    """Connected (the status topic), outbox depth and rejected frames per reason (the stats topic),
    the shared state (with [redis]), and the collection list (the planner's retained topic)."""
    stats = integrate.stats_topic(gw.base, gw.gateway_id)
    expire = int(3 * gw.stats_interval_s) + 1
    diag = {"entity_category": "diagnostic", "state_topic": stats, "expire_after": expire, "state_class": "measurement"}
    out = {
        "connected": ("binary_sensor", {
            "name": "Connected", "device_class": "connectivity", "entity_category": "diagnostic", "availability": None,
            "state_topic": integrate.status_topic(gw.base, gw.gateway_id), "payload_on": "online", "payload_off": "offline"}),
        "outbox_depth": ("sensor", dict(diag, name="Outbox depth", icon="mdi:tray-full", unit_of_measurement="messages",
                                        value_template="{{ value_json.outbox_depth | int }}")),
        "rejected": ("sensor", dict(diag, name="Frames rejected", icon="mdi:cancel", unit_of_measurement="frames",
                                    state_class="total_increasing",
                                    value_template="{{ value_json.frames_rejected_total.values() | sum | int "
                                                   "if value_json.frames_rejected_total is defined else 0 }}",
                                    json_attributes_topic=stats,
                                    json_attributes_template="{{ value_json.frames_rejected_total | default({}) | tojson }}")),
        "collection_list": ("sensor", {
            "name": "Bins to collect", "icon": "mdi:truck", "unit_of_measurement": "bins",
            "state_topic": "%s/plan" % gw.base, "value_template": "{{ value_json.bins | length }}",
            "json_attributes_topic": "%s/plan" % gw.base,
            "json_attributes_template": "{{ {'next_round': value_json.next_round, 'bins': value_json.bins | map(attribute="
                                        "'bin_id') | list} | tojson }}"}),
    }
    for reason in Reason:
        out["rejected_" + reason.value] = ("sensor", dict(
            diag, name="Rejected: %s" % reason.value.replace("_", " "), unit_of_measurement="frames",
            state_class="total_increasing", enabled_by_default=False,
            value_template="{{ (value_json.frames_rejected_total | default({})).get('%s', 0) | int }}" % reason.value))
    if gw.shared_state:
        out["shared_state"] = ("sensor", {
            "name": "Shared state", "entity_category": "diagnostic", "icon": "mdi:database-sync",
            "state_topic": "%s/gateway/%s/shared_state" % (gw.base, gw.gateway_id), "value_template": "{{ value_json.state }}"})
    return out


def bin_device_block(site, device, sw_version=None, via=None):
    node = uid_prefix(site, device.bin_id)
    block = {"identifiers": [node], "name": device.name or "Bin %s" % device.bin_id, "manufacturer": "binlink",
             "model": "ultrasonic bin sensor", "serial_number": device.dev}
    if sw_version:
        block["sw_version"] = sw_version
    if via:
        block["via_device"] = via
    return block


def gateway_device_block(gw):
    return {"identifiers": [gateway_node(gw.site, gw.gateway_id)], "name": "binlink gateway %s" % gw.gateway_id,
            "manufacturer": "binlink", "model": "gateway", "sw_version": __version__}


# the payloads ------------------------------------------------------------------------------------

def _entity_messages(prefix, node, block, entities, availability=None):
    out = []
    for entity, (component, cfg) in entities.items():
        uid = "%s_%s" % (node, entity)
        cfg = dict(cfg, unique_id=uid, default_entity_id="%s.%s" % (component, uid), device=block, origin=ORIGIN)
        _available(cfg, availability)
        out.append(("%s/%s/%s/%s/config" % (prefix, component, node, entity), json.dumps(cfg, sort_keys=True)))
    return out


def _available(cfg, availability):
    """The device's availability on each entity, but for one that says `"availability": None`
    (Connected: it shows "off" while the gateway is away, not "unavailable")."""
    if cfg.pop("availability", True) is not None and availability:
        cfg["availability"] = availability
    return cfg


def _device_message(prefix, node, block, entities, availability=None):
    cmps = {}
    for entity, (component, cfg) in entities.items():
        uid = "%s_%s" % (node, entity)
        cmps[entity] = _available(dict(cfg, p=component, unique_id=uid, default_entity_id="%s.%s" % (component, uid)),
                                  availability)
    cfg = {"dev": block, "o": ORIGIN, "cmps": cmps}
    return "%s/device/%s/config" % (prefix, node), json.dumps(cfg, sort_keys=True)


def _gateway_availability(gw):
    return [{"topic": integrate.status_topic(gw.base, gw.gateway_id), "payload_available": "online",
             "payload_not_available": "offline"}]


def messages(prefix, base, site, device, sw_version=None, via=None):
    """Per-entity mode: (topic, payload JSON) for each entity of one bin (a BinInfo or a registry
    device), all to be published retained."""
    node = uid_prefix(site, device.bin_id)
    return _entity_messages(prefix, node, bin_device_block(site, device, sw_version, via), bin_entities(base, device))


def device_message(prefix, base, site, device, sw_version=None, via=None):
    """Device mode: the one (topic, payload JSON) of a bin."""
    node = uid_prefix(site, device.bin_id)
    return _device_message(prefix, node, bin_device_block(site, device, sw_version, via), bin_entities(base, device))


def gateway_messages(prefix, gw, mode):
    node = gateway_node(gw.site, gw.gateway_id)
    make = _device_message if mode == "device" else _entity_messages
    out = make(prefix, node, gateway_device_block(gw), gateway_entities(gw), _gateway_availability(gw))
    return [out] if mode == "device" else out


def bin_messages(prefix, base, site, device, mode, sw_version=None, via=None):
    """The bin's retained configs in the given mode: one in "device" mode, one per entity else."""
    if mode == "device":
        return [device_message(prefix, base, site, device, sw_version, via)]
    return messages(prefix, base, site, device, sw_version, via)


def node_topics(prefix, node, entities, mode):
    """The discovery topics of a device's configs in a mode (what clearing it takes)."""
    if mode == "device":
        return ["%s/device/%s/config" % (prefix, node)]
    return ["%s/%s/%s/%s/config" % (prefix, component, node, entity) for entity, (component, _) in entities.items()]


def discovery_topics(prefix, base, site, device):
    """Every topic a bin's discovery may be retained on, both modes (`registry retire` clears them)."""
    node, entities = uid_prefix(site, device.bin_id), bin_entities(base, device)
    return node_topics(prefix, node, entities, "device") + node_topics(prefix, node, entities, "entity")
