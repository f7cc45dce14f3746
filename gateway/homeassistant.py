"""Home Assistant MQTT discovery: one device per bin, retained configs under the discovery prefix."""
import json

from binlink.gateway import integrate

# (object id, component, name, state field, extra config)
ENTITIES = (
    ("fill", "sensor", "Fill level", "fill_pct", {"unit_of_measurement": "%", "state_class": "measurement", "icon": "mdi:delete"}),
    ("temperature", "sensor", "Temperature", "temperature_c",
     {"unit_of_measurement": "°C", "device_class": "temperature", "state_class": "measurement"}),
    ("battery", "sensor", "Battery", "battery_v",
     {"unit_of_measurement": "V", "device_class": "voltage", "state_class": "measurement", "entity_category": "diagnostic"}),
    ("rssi", "sensor", "Signal strength", "rssi",
     {"unit_of_measurement": "dBm", "device_class": "signal_strength", "state_class": "measurement", "entity_category": "diagnostic"}),
)


def messages(prefix, base, gw_id, device):
    """(topic, payload) pairs, all to be published retained."""
    dev_block = {
        "identifiers": ["binlink_%s" % device.dev],
        "name": device.name or "Bin %s" % device.bin_id,
        "manufacturer": "binlink",
        "model": "ultrasonic bin sensor",
        "serial_number": device.dev,
    }
    common = {
        "state_topic": integrate.state_topic(base, device.bin_id),
        "availability_topic": integrate.status_topic(base, gw_id),
        "device": dev_block,
    }
    out = []
    for obj, component, name, field, extra in ENTITIES:
        uid = "binlink_%s_%s" % (device.dev, obj)
        cfg = dict(common, name=name, unique_id=uid, object_id="%s_%s" % (device.bin_id, obj),
                   value_template="{{ value_json.%s }}" % field, **extra)
        out.append(("%s/%s/%s/%s/config" % (prefix, component, uid, obj), json.dumps(cfg, sort_keys=True)))
    uid = "binlink_%s_problem" % device.dev
    problem = dict(common, name="Problem", unique_id=uid, object_id="%s_problem" % device.bin_id, device_class="problem",
                   value_template="{{ 'ON' if value_json.problem else 'OFF' }}")
    out.append(("%s/binary_sensor/%s/problem/config" % (prefix, uid), json.dumps(problem, sort_keys=True)))
    return out
