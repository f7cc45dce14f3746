"""The broker's retained bin states at start-up: read in one short MQTT session, each judged as
strictly as a frame (parse_state: anyone who may publish under the base topic can leave one
there), and what the valid ones support: frame counters and bin states under each device's current
key, and the clock check's evidence of the time. A refused state is counted and logged, never used.
When the states are used is start-up's decision (recovery.py)."""
import json
import logging
import re
import threading
import uuid
from datetime import datetime
from typing import NamedTuple

import paho.mqtt.client as mqtt

from binlink.wire import codec
from binlink.gateway import clock, config, integrate, logs
from binlink.gateway.heads import BinState, Counter
from binlink.gateway.registry import Device

log = logs.get("recovery")  # start-up recovery's lines, under its logger as before they moved here
MAX_STATE_BYTES = 4096  # a rendered state is about 600 bytes; anything far larger is not one of ours
FUTURE_TOLERANCE_S = clock.TOLERANCE_S  # gateways' clocks differ a little; a state from later is no evidence
LOGGED_REJECTIONS = 10  # refused states logged one by one at each start; the rest in one summary line
_DEVICE_HEX = re.compile(r"[0-9a-f]{6}")
_FLAG_NAMES = frozenset(name for _, name in codec.FLAG_NAMES)


class RetainedState(NamedTuple):
    """A retained bin state that passed parse_state: every field of the type and range it must have."""
    bin_id: str
    device: Device  # the device the registry has for this bin now
    fcnt: int
    key_epoch: int | None  # None: published before states carried their key's epoch
    fill_pct: float | None
    flags: int
    received_at: float
    time_synced: bool


def _is_u32(v):
    return type(v) is int and 0 <= v <= 0xFFFFFFFF  # type(): bool and float are refused, not coerced


def parse_state(bin_id, payload, devices_by_dev, now):
    """(RetainedState, None) or (None, reason): a retained state is judged as strictly as a frame,
    since anyone who may publish under the base topic can leave one there."""
    if len(payload) > MAX_STATE_BYTES:
        return None, "too_large"
    try:
        s = json.loads(payload)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested beyond the parser
        return None, "not_json"
    if not isinstance(s, dict):
        return None, "not_object"
    dev = s.get("device")
    if not isinstance(dev, str) or not _DEVICE_HEX.fullmatch(dev):
        return None, "device"
    device = devices_by_dev.get(dev)
    if device is None:
        return None, "unknown_device"
    if device.bin_id != bin_id:
        return None, "other_bin"
    if not _is_u32(s.get("fcnt")):
        return None, "fcnt"
    epoch = s.get("key_epoch")
    if "key_epoch" in s and not _is_u32(epoch):
        return None, "key_epoch"
    fill = s.get("fill_pct")
    if fill is not None and not (type(fill) in (int, float) and 0 <= fill <= 100):  # NaN compares false
        return None, "fill_pct"
    flags = s.get("flags")
    if not isinstance(flags, list) or not all(isinstance(f, str) and f in _FLAG_NAMES for f in flags):
        return None, "flags"
    at = _parse_time(s.get("received_at"))
    if at is None or at < clock.RELEASED:
        return None, "received_at"
    if at > now + FUTURE_TOLERANCE_S:
        return None, "future"
    synced = s.get("time_synced")
    if type(synced) is not bool:
        return None, "time_synced"
    return RetainedState(bin_id, device, s["fcnt"], epoch, fill, codec.flag_bits(flags), at, synced), None


def _parse_time(text):
    """Seconds since the epoch of an ISO time with its zone (as the gateway writes it), else None."""
    if not isinstance(text, str) or len(text) > 40:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t.timestamp() if t.tzinfo is not None else None  # a time without a zone is no time


def retained_states(cfg, timeout_s):
    """The retained messages under the base topic's bin states: [(bin_id, payload)], or None when
    the broker cannot be reached in time. Complete: a probe published after subscribing comes back
    after every retained message (one connection's messages arrive in order). An oversized payload
    is cut just past the size a state may have, so a broker full of them cannot fill the memory."""
    probe = "%s/gateway/%s/recovery-probe/%s" % (cfg.base_topic, cfg.gateway_id, uuid.uuid4().hex)
    states_filter = "%s/bin/+/state" % cfg.base_topic
    states, done = [], threading.Event()
    # an id of this session alone: a fixed one could be taken over (the broker drops the older
    # session) by another start of the same config or by anyone who knows the name
    client_id = "%s-recovery-%s" % (cfg.client_id, uuid.uuid4().hex[:8])
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    config.apply_mqtt_settings(client, cfg.mqtt)

    def on_connect(c, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            c.subscribe([(states_filter, 1), (probe, 1)])

    def on_message(c, userdata, msg):
        if msg.topic == probe:
            done.set()
        elif msg.retain:
            states.append((msg.topic.rsplit("/", 2)[-2], msg.payload[:MAX_STATE_BYTES + 1]))  # enough to refuse

    client.on_connect = on_connect
    client.on_subscribe = lambda c, *a: c.publish(probe, b"", qos=1)
    client.on_message = on_message
    try:
        client.connect_async(cfg.mqtt.host, cfg.mqtt.port, keepalive=30)
        client.loop_start()
        reached = done.wait(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()
    return states if reached else None


def valid_states(cfg, states, devices, metrics, now):
    """The states that pass parse_state; each refused one is counted and logged (the first
    LOGGED_REJECTIONS by topic, then one line with how many more)."""
    by_dev = {d.dev: d for d in devices.values()}
    valid, refused = [], 0
    for bin_id, payload in states:
        state, reason = parse_state(bin_id, payload, by_dev, now)
        if state is not None:
            valid.append(state)
            continue
        refused += 1
        metrics.readback_rejected.labels("retained", reason).inc()
        if refused <= LOGGED_REJECTIONS:
            logs.event(log, logging.WARNING, "retained bin state refused: not used for counters or the clock",
                       topic=integrate.state_topic(cfg.base_topic, bin_id), reason=reason)
    if refused > LOGGED_REJECTIONS:
        logs.event(log, logging.WARNING, "more retained bin states refused", more=refused - LOGGED_REJECTIONS)
    return valid


def newest_synced_time(states):
    """Clock evidence: the newest received_at of a synced state (validated, so never from the future)."""
    return max((s.received_at for s in states if s.time_synced), default=None)


def counters_from_states(states, local_bins):
    """(counters, bins) the validated states support: a state counts only under the key its device
    has now. A state without key_epoch (published by 0.4.0 or before) can be of any key the bin had, so it
    counts only for a device never re-keyed (epoch 0); a new key's counter starts again at 0, and
    an old key's counter taken for it would refuse the new key's frames as replays."""
    counters, bins = {}, {}
    for s in states:
        device = s.device
        epoch = device.key_epoch if s.key_epoch is None and device.key_epoch == 0 else s.key_epoch
        if epoch != device.key_epoch:
            continue
        local = local_bins.get(s.bin_id)
        if local is not None and local.updated_at > s.received_at and local.fcnt < s.fcnt:
            continue  # a newer state here with a lower counter: the bin was re-provisioned since
        counter = counters.get(device.device_id)
        if counter is not None and counter.fcnt >= s.fcnt:
            continue
        counters[device.device_id] = Counter(s.fcnt, device.key_id, device.key_epoch)
        if local is None or local.is_newer(device.key_epoch, s.fcnt):
            bins[s.bin_id] = BinState(device.key_epoch, s.fcnt, s.fill_pct, s.flags, s.received_at)
    return counters, bins
