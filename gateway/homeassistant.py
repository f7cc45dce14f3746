"""Home Assistant MQTT discovery: one device per bin, retained configs under the discovery prefix.

Ids are keyed on site and bin id (binlink_<site>_<bin_id>_<entity>), not on the radio device id,
so a bin keeps its entities through a re-flash or a new sensor board, and two sites never collide.
Entities take no availability topic from a gateway (with several gateways none of them speaks for
a bin); each expires instead when its bin has been silent for EXPIRE_REPORTS report intervals.

`Discovery` remembers (in the state folder) what it last published, so a reconnect sends only
what changed and clears the configs of bins no longer in the registry; when Home Assistant says
it restarted (<prefix>/status "online") everything is sent again."""
import hashlib
import itertools
import json
import os
from typing import NamedTuple

from binlink.gateway import integrate

EXPIRE_REPORTS = 3  # a bin is unavailable after missing this many reports in a row
ORIGIN = {"name": "binlink"}

# (entity, component, name, extra config); the value template reads the bin's retained state
SENSORS = (
    ("fill", "Fill level", "{{ value_json.fill_pct }}",
     {"unit_of_measurement": "%", "state_class": "measurement", "icon": "mdi:delete"}),
    ("full_at", "Full at", "{{ value_json.full_at if value_json.full_at else 'None' }}", {"device_class": "timestamp"}),
    ("fill_rate", "Fill rate", "{{ value_json.fill_rate_pct_per_day if value_json.fill_rate_pct_per_day is not none else 'None' }}",
     {"unit_of_measurement": "%/d", "state_class": "measurement", "icon": "mdi:trending-up"}),
    ("temperature", "Temperature", "{{ value_json.temperature_c }}",
     {"unit_of_measurement": "°C", "device_class": "temperature", "state_class": "measurement"}),
    ("battery", "Battery", "{{ value_json.battery_v }}",
     {"unit_of_measurement": "V", "device_class": "voltage", "state_class": "measurement", "entity_category": "diagnostic"}),
    ("rssi", "Signal strength", "{{ value_json.rssi }}",
     {"unit_of_measurement": "dBm", "device_class": "signal_strength", "state_class": "measurement", "entity_category": "diagnostic"}),
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


def _slug(text):
    return "".join(c if c.isalnum() else "_" for c in text.lower())


def uid_prefix(site, bin_id):
    return "binlink_%s_%s" % (_slug(site), _slug(bin_id))


def messages(prefix, base, site, device, sw_version=None):
    """(topic, payload JSON) pairs for one bin (a BinInfo or a registry device), all to be published retained."""
    node = uid_prefix(site, device.bin_id)
    dev_block = {
        "identifiers": [node],
        "name": device.name or "Bin %s" % device.bin_id,
        "manufacturer": "binlink",
        "model": "ultrasonic bin sensor",
        "serial_number": device.dev,
    }
    if sw_version:
        dev_block["sw_version"] = sw_version
    state = integrate.state_topic(base, device.bin_id)
    expire = EXPIRE_REPORTS * device.report_s
    common = {"state_topic": state, "device": dev_block, "origin": ORIGIN}
    out = []

    def add(component, entity, cfg):
        uid = "%s_%s" % (node, entity)
        cfg = dict(common, unique_id=uid, default_entity_id="%s.%s" % (component, uid), **cfg)
        out.append(("%s/%s/%s/%s/config" % (prefix, component, node, entity), json.dumps(cfg, sort_keys=True)))

    for entity, name, template, extra in SENSORS:
        cfg = dict(name=name, value_template=template, expire_after=expire, **extra)
        if entity == "fill":
            cfg.update(json_attributes_topic=state, json_attributes_template=ATTRIBUTES)
        add("sensor", entity, cfg)
    for entity, flag, name, device_class in ALARMS:
        add("binary_sensor", entity, {
            "name": name, "device_class": device_class, "expire_after": expire,
            "value_template": "{{ 'ON' if '%s' in value_json.flags else 'OFF' }}" % flag,
        })
    add("event", "collection", {
        "name": "Collection", "state_topic": integrate.event_topic(base, device.bin_id), "event_types": list(EVENT_TYPES),
        # other events on the topic render to {} and Home Assistant ignores them
        "value_template": "{%% if value_json.event in %s %%}{{ {'event_type': value_json.event, 'fill_pct': value_json.fill_pct} "
                          "| tojson }}{%% else %%}{}{%% endif %%}" % json.dumps(list(EVENT_TYPES)),
    })
    return out


class Discovery:
    """What is published, by digest, persisted: republish only changes, clear retired bins."""

    def __init__(self, path, prefix, base, site):
        self.path = path
        self.prefix = prefix
        self.base = base
        self.site = site
        self.published = {}  # topic -> sha256 of the payload last handed to the broker
        self.first_run = False  # no record: configs of the old scheme (keyed on the radio id) may be retained
        try:
            with open(path) as f:
                self.published = json.load(f)
        except FileNotFoundError:
            self.first_run = True
        except ValueError:
            pass

    def changes(self, devices, firmware=None, force=False):
        """(topic, payload) to publish: new or changed configs (all with force), and an empty
        retained payload for each config of a bin no longer in `devices`."""
        firmware = firmware or {}
        wanted = {}
        for device in devices.values():
            for topic, payload in messages(self.prefix, self.base, self.site, device, firmware.get(device.dev)):
                wanted[topic] = payload
        out = [(t, p) for t, p in wanted.items() if force or self.published.get(t) != _digest(p)]
        out += [(t, "") for t in self.published if t not in wanted]
        if self.first_run:  # upgrading: clear what gateways before this scheme published, no ghosts
            out += [(t, "") for device in devices.values() for t in _legacy_topics(self.prefix, device)]
        return out

    def mark(self, sent):
        """Records what was handed to the broker (QoS 1, retained) and saves it atomically."""
        self.first_run = False
        for topic, payload in sent:
            if payload:
                self.published[topic] = _digest(payload)
            else:
                self.published.pop(topic, None)
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.published, f, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:  # a full disk: after a restart discovery is sent again, which is harmless
            if os.path.exists(tmp):
                os.unlink(tmp)


def _legacy_topics(prefix, device):
    """Discovery topics of binlink before site + bin ids (keyed on the radio's device id)."""
    old = [("sensor", e) for e in ("fill", "temperature", "battery", "rssi")] + [("binary_sensor", "problem")]
    return ["%s/%s/binlink_%s_%s/%s/config" % (prefix, c, device.dev, e, e) for c, e in old]


def _digest(payload):
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class Announcer:
    """Discovery configs on their way to the broker: queued, handed out as the publisher's in-flight
    window has room, recorded in a Discovery once acknowledged (one write per round: up to 110,000
    configs), queued again when a session ends before their acknowledgement."""

    def __init__(self, discovery):
        self.discovery = discovery
        self.queue = {}  # topic -> payload
        self.in_flight = 0
        self.acked = []  # (topic, payload) acknowledged, not yet recorded

    def queue_changes(self, bins, firmware, force=False):
        changes = self.discovery.changes(bins, firmware, force=force)
        self.queue.update(changes)
        return changes

    def take(self, n, held_back=()):
        """Up to n (topic, payload) to publish now; those on held_back topics (the broker denies them)
        are dropped: not recorded, they are among the changes again next time."""
        taken = [(topic, self.queue.pop(topic)) for topic in list(itertools.islice(self.queue, n))]
        out = [item for item in taken if item[0] not in held_back]
        self.in_flight += len(out)
        return out

    def acknowledged(self, item):
        self.acked.append(item)
        self.in_flight -= 1

    def session_lost(self, unacknowledged):
        for topic, payload in unacknowledged:
            self.queue.setdefault(topic, payload)
        self.in_flight = 0
        self.record()

    def record(self, final=False):
        """Writes what was acknowledged once nothing of the round is left to send or to hear back
        about (final: the process is ending); returns what it wrote."""
        if self.acked and (final or not (self.queue or self.in_flight)):
            self.discovery.mark(self.acked)
            recorded, self.acked = self.acked, []
            return recorded
        return []
