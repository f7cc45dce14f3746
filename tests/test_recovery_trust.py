"""What start-up recovery believes of the broker's retained bin states (issue 18).

A retained state is judged as strictly as a frame: a fixed set of hostile ones, published retained
to a real Mosquitto, must neither stop the gateway nor raise a counter, and each is counted. A bin
re-keyed and then restarted, killed or stripped of its state file must not be locked out by its
old key's retained state. tests/bench_recovery.py runs the same scenarios for its figures."""
import json
import os
import subprocess
import time

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, strategies as st

from binlink.wire import framing
from binlink.gateway import clock, config
from binlink.gateway.metrics import Metrics
from binlink.gateway.retained import LOGGED_REJECTIONS, newest_synced_time, parse_state, valid_states
from binlink.gateway.registry import Device
from tests.harness import BINLINK, KEY, GatewayProcess, key_from_key_file, wait_for
from tests.test_gateway import DEVICES, reading

BASE = "binlink/testcity"
POISON_FCNT = 40000  # were a hostile state believed, every frame of its bin below this would be a replay
DROP = object()  # a field left out of the state
GENUINE_DEV, GENUINE_BIN = 0x200, "bin-g"


def _iso(ts):
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


def state(dev, bin_id, **fields):
    """A state as the gateway renders it (the fields recovery reads), with fields replaced or dropped."""
    s = {"device": "%06x" % dev, "bin_id": bin_id, "fcnt": POISON_FCNT, "key_epoch": 0, "fill_pct": 40.0, "flags": [],
         "received_at": _iso(time.time() - 60), "time_synced": True}
    s.update(fields)
    return json.dumps({k: v for k, v in s.items() if v is not DROP}).encode()


def _raw(payload):
    return lambda dev, bin_id: payload


def _fields(**fields):
    return lambda dev, bin_id: state(dev, bin_id, **fields)


HOSTILE = {  # name -> (payload for the state of bin (dev, bin_id)), the reason it is refused for
    "not_json": (_raw(b"fill=40"), "not_json"),
    "not_utf8": (_raw(b'{"device": "0000\xff\xfe", "fcnt": 40000}'), "not_json"),
    "nested_2000_deep": (_raw(b"[" * 2000 + b"]" * 2000), "not_json"),
    "one_megabyte": (lambda dev, bin_id: state(dev, bin_id, pad="x" * (1 << 20)), "too_large"),
    "array": (_raw(b"[1, 2]"), "not_object"),
    "null": (_raw(b"null"), "not_object"),
    "empty_object": (_raw(b"{}"), "device"),
    "device_int": (lambda dev, bin_id: state(dev, bin_id, device=dev), "device"),
    "device_short": (_fields(device="a1"), "device"),
    "device_nested": (lambda dev, bin_id: state(dev, bin_id, device={"id": "%06x" % dev}), "device"),
    "device_unknown": (_fields(device="fffff0"), "unknown_device"),
    "another_bins_device": (_fields(device="%06x" % GENUINE_DEV), "other_bin"),
    "fcnt_2_32": (_fields(fcnt=2**32), "fcnt"),
    "fcnt_negative": (_fields(fcnt=-1), "fcnt"),
    "fcnt_1e30": (_fields(fcnt=1e30), "fcnt"),
    "fcnt_infinity": (_fields(fcnt=float("inf")), "fcnt"),
    "fcnt_nan": (_fields(fcnt=float("nan")), "fcnt"),
    "fcnt_huge_int": (_fields(fcnt=10**30), "fcnt"),
    "fcnt_float": (_fields(fcnt=40000.0), "fcnt"),
    "fcnt_string": (_fields(fcnt="40000"), "fcnt"),
    "fcnt_bool": (_fields(fcnt=True), "fcnt"),
    "fcnt_missing": (_fields(fcnt=DROP), "fcnt"),
    "key_epoch_negative": (_fields(key_epoch=-1), "key_epoch"),
    "key_epoch_string": (_fields(key_epoch="0"), "key_epoch"),
    "key_epoch_float": (_fields(key_epoch=0.0), "key_epoch"),
    "key_epoch_null": (_fields(key_epoch=None), "key_epoch"),
    "fill_object": (_fields(fill_pct={}), "fill_pct"),
    "fill_string": (_fields(fill_pct="abc"), "fill_pct"),
    "fill_nan": (_fields(fill_pct=float("nan")), "fill_pct"),
    "fill_infinity": (_fields(fill_pct=float("inf")), "fill_pct"),
    "fill_over_100": (_fields(fill_pct=100.5), "fill_pct"),
    "fill_negative": (_fields(fill_pct=-1), "fill_pct"),
    "fill_bool": (_fields(fill_pct=True), "fill_pct"),
    "fill_400_digits": (_fields(fill_pct=10**400), "fill_pct"),  # too large for a float: no conversion may raise
    "flags_int": (_fields(flags=5), "flags"),
    "flags_unknown": (_fields(flags=["tilt", "exploded"]), "flags"),
    "flags_not_names": (_fields(flags=[1]), "flags"),
    "flags_string": (_fields(flags="tilt"), "flags"),
    "flags_object": (_fields(flags={"tilt": True}), "flags"),
    "received_2099": (_fields(received_at="2099-01-01T00:00:00.000Z"), "future"),
    "received_before_release": (_fields(received_at="2020-01-01T00:00:00.000Z"), "received_at"),
    "received_not_a_time": (_fields(received_at="yesterday"), "received_at"),
    "received_year_1": (_fields(received_at="0001-01-01T00:00:00+14:00"), "received_at"),
    "received_number": (_fields(received_at=1.79e9), "received_at"),
    "received_without_zone": (lambda dev, bin_id: state(dev, bin_id, received_at=_iso(time.time() - 60)[:-5]), "received_at"),
    "received_missing": (_fields(received_at=DROP), "received_at"),
    "time_synced_string": (_fields(time_synced="true"), "time_synced"),
    "time_synced_int": (_fields(time_synced=1), "time_synced"),
    "time_synced_missing": (_fields(time_synced=DROP), "time_synced"),
}


def poisoned_fleet():
    """Registry entries (one bin per hostile state, and one genuine bin) and the retained messages
    to publish: [(topic, payload)]."""
    devices = [(GENUINE_DEV, GENUINE_BIN, KEY, 1200, 200)]
    retained = []
    for i, (make, _) in enumerate(HOSTILE.values()):
        dev, bin_id = 0x100 + i, "bin-p%d" % i
        devices.append((dev, bin_id, KEY, 1200, 200))
        retained.append(("%s/bin/%s/state" % (BASE, bin_id), make(dev, bin_id)))
    return devices, retained


def publish_retained(port, messages):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-poison-%d" % os.getpid())
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        for topic, payload in messages:
            c.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


def _db(gw):
    return os.path.join(gw.tmp, "state", "gateway.sqlite")


def _delete_state(gw):
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(_db(gw) + suffix):
            os.unlink(_db(gw) + suffix)


def _uplink_ids(sub):
    return {e["message_id"] for e in sub.events()}


def _last_state(sub, bin_id):
    found = sub.json("bin/%s/state" % bin_id)
    return found[-1] if found else None


# the parser on its own -------------------------------------------------------------------------
def test_every_hostile_state_is_refused_with_its_reason_and_a_genuine_one_passes():
    devices, retained = poisoned_fleet()
    by_dev = {"%06x" % d: Device(d, b, k, depth, full) for d, b, k, depth, full in devices}
    now = time.time()
    for (name, (_, reason)), (topic, payload) in zip(HOSTILE.items(), retained):
        parsed, why = parse_state(topic.split("/")[-2], payload, by_dev, now)
        assert (parsed, why) == (None, reason), name
    genuine, why = parse_state(GENUINE_BIN, state(GENUINE_DEV, GENUINE_BIN, flags=["tilt"]), by_dev, now)
    assert why is None and (genuine.fcnt, genuine.key_epoch, genuine.fill_pct, genuine.time_synced) == (POISON_FCNT, 0, 40.0, True)
    # up to 0.4.0 states carried no key_epoch: still a state, of an unknown key
    legacy, why = parse_state(GENUINE_BIN, state(GENUINE_DEV, GENUINE_BIN, key_epoch=DROP), by_dev, now)
    assert why is None and legacy.key_epoch is None


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=12)


@given(field=st.sampled_from(["device", "fcnt", "key_epoch", "fill_pct", "flags", "received_at", "time_synced"]),
       value=json_values, raw=st.binary(max_size=200))
def test_the_parser_answers_any_payload_and_never_raises(field, value, raw):
    by_dev = {"%06x" % GENUINE_DEV: Device(GENUINE_DEV, GENUINE_BIN, KEY, 1200, 200)}
    for payload in (state(GENUINE_DEV, GENUINE_BIN, **{field: value}), raw):
        parsed, why = parse_state(GENUINE_BIN, payload, by_dev, time.time())
        assert (parsed is None) != (why is None)


def test_refused_states_are_counted_and_logged_by_topic_with_a_limit(caplog):
    devices, retained = poisoned_fleet()
    registry = {d: Device(d, b, k, depth, full) for d, b, k, depth, full in devices}
    cfg = config.parse({"gateway": {"id": "g", "site": "testcity", "registry": "r", "state_dir": "d"}, "source": [{"port": "/x"}]})
    m = Metrics()
    valid = valid_states(cfg, [(t.split("/")[-2], p) for t, p in retained], registry, m, time.time())
    assert valid == []
    assert m.value("binlink_readback_rejected_total", source="retained", reason="fcnt") == 10
    assert sum(m.value("binlink_readback_rejected_total", source="retained", reason=r) for r in
               {r for _, r in HOSTILE.values()}) == len(HOSTILE)
    logged = [r.fields for r in caplog.records if r.getMessage() == "retained bin state refused: not used for counters or the clock"]
    assert len(logged) == LOGGED_REJECTIONS
    assert logged[0] == {"topic": "binlink/testcity/bin/bin-p0/state", "reason": "not_json"}
    [summary] = [r.fields for r in caplog.records if r.getMessage() == "more retained bin states refused"]
    assert summary == {"more": len(HOSTILE) - LOGGED_REJECTIONS}


def test_a_state_from_the_future_is_no_clock_evidence():
    registry = {GENUINE_DEV: Device(GENUINE_DEV, GENUINE_BIN, KEY, 1200, 200)}
    cfg = config.parse({"gateway": {"id": "g", "site": "testcity", "registry": "r", "state_dir": "d"}, "source": [{"port": "/x"}]})
    now = time.time()
    near = state(GENUINE_DEV, GENUINE_BIN, received_at=_iso(now + clock.TOLERANCE_S / 2))
    far = state(GENUINE_DEV, GENUINE_BIN, received_at=_iso(now + 3 * 365 * 86400))
    assert len(valid_states(cfg, [(GENUINE_BIN, near)], registry, Metrics(), now)) == 1  # clocks differ a little
    m = Metrics()
    assert newest_synced_time(valid_states(cfg, [(GENUINE_BIN, far)], registry, m, now)) is None
    assert m.value("binlink_readback_rejected_total", source="retained", reason="future") == 1


# poisoned retained states against the gateway process ------------------------------------------
def poisoned_start(tmp, broker, pty, subscriber):
    """Hostile retained states on the broker, then a start with the state intact and one after the
    state file is lost. Returns {phase: (refused, counters raised)} and the frames refused after the
    loss (a frame of each poisoned bin and a recording of the genuine bin's last frame: 1 if none of
    the hostile states raised a counter and the genuine one did)."""
    devices, retained = poisoned_fleet()
    gw = GatewayProcess(tmp, broker.port, [("radio0", pty.link, "raw")], devices=devices).start()
    found = {}
    try:
        for n in range(1, 11):
            pty.write(framing.frame(reading(n, dev=GENUINE_DEV)))
        wait_for(lambda: (_last_state(subscriber, GENUINE_BIN) or {}).get("fcnt") == 10, what="genuine state 10")
        wait_for(lambda: gw.metric("binlink_outbox_depth") == 0, what="outbox drained")
        assert gw.terminate() == 0
        publish_retained(broker.port, retained)
        for phase in ("intact", "lost"):
            if phase == "lost":
                gw.kill()
                _delete_state(gw)
            gw.start()
            assert gw.alive()
            found[phase] = (gw.metric("binlink_readback_rejected_total", source="retained"),
                            gw.metric("binlink_counters_from_broker_total"))
            assert gw.metric("binlink_clock_suspect") == 0, "a state from 2099 was taken for the time"
        pty.write(framing.frame(reading(10, dev=GENUINE_DEV)))  # a recording: refused if the genuine state was believed
        for dev, _, _, _, _ in devices[1:]:
            pty.write(framing.frame(reading(2, dev=dev)))
        wait_for(lambda: gw.metric("binlink_frames_read_total") == len(devices), what="every frame read")
        refused_after_loss = gw.metric("binlink_frames_rejected_total")
        assert "Traceback" not in gw.output()
        return found, refused_after_loss
    finally:
        if gw.alive():
            gw.kill()


def test_hostile_retained_states_neither_stop_the_gateway_nor_raise_a_counter(tmp_path, broker, pty, subscriber):
    found, refused_after_loss = poisoned_start(tmp_path, broker, pty, subscriber)
    assert found["intact"] == (len(HOSTILE), 0)  # state intact: every one refused, no counter taken from the broker
    assert found["lost"] == (len(HOSTILE), 1)  # state lost: the genuine state alone raised its bin's counter
    assert refused_after_loss == 1  # the genuine bin's recording; every poisoned bin's frame 2 accepted


# re-keying against restarts, power cuts and state loss -----------------------------------------
REKEY_ORDERS = ("restart", "sigkill", "state_lost", "state_lost_pre_epoch_state")


def rekey_then(order, tmp, broker, pty, subscriber, old_key_counters=(1, 2, 3, 4, 5)):
    """bin-a's old key reaches its last counter (its retained state on the broker), `binlink
    registry rekey`, then `order`, then the new key's readings 0..4. Returns how many of them the
    gateway refused."""
    gw = GatewayProcess(tmp, broker.port, [("radio0", pty.link, "raw")], devices=DEVICES).start()
    try:
        for n in old_key_counters:
            pty.write(framing.frame(reading(n)))
        last = old_key_counters[-1]
        wait_for(lambda: (_last_state(subscriber, "bin-a") or {}).get("fcnt") == last, what="old key's state %d" % last)
        old_state = _last_state(subscriber, "bin-a")
        assert old_state["key_epoch"] == 0
        wait_for(lambda: gw.metric("binlink_outbox_depth") == 0, what="outbox drained")
        key_out = os.path.join(str(tmp), "bin-a.key")
        r = subprocess.run([BINLINK, "registry", "--config", gw.config, "rekey", "bin-a", "--key-out", key_out],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        new_key = key_from_key_file(key_out)
        if order == "restart":
            assert gw.terminate() == 0
        else:
            gw.kill()
        if order.startswith("state_lost"):
            _delete_state(gw)
        if order == "state_lost_pre_epoch_state":  # as 0.4.0 published it: no key_epoch
            publish_retained(broker.port, [("%s/bin/bin-a/state" % BASE,
                                            json.dumps({k: v for k, v in old_state.items() if k != "key_epoch"}).encode())])
        gw.start()
        for n in range(5):
            pty.write(framing.frame(reading(n, key=new_key)))
        wait_for(lambda: gw.metric("binlink_frames_read_total") == 5, what="the new key's readings read")
        refused = int(gw.metric("binlink_frames_rejected_total"))
        if not refused:
            want = {"0000a1:1:%d" % n for n in range(5)}
            wait_for(lambda: want <= _uplink_ids(subscriber), what="the new key's readings published")
        assert "Traceback" not in gw.output()
        return refused
    finally:
        if gw.alive():
            gw.kill()


@pytest.mark.parametrize("order", REKEY_ORDERS)
def test_a_rekeyed_bin_is_heard_after_a_restart_a_power_cut_or_a_lost_state(tmp_path, broker, pty, subscriber, order):
    assert rekey_then(order, tmp_path, broker, pty, subscriber) == 0


def test_an_old_key_past_40000_does_not_lock_the_new_key_out_after_a_state_loss(tmp_path, broker, pty, subscriber):
    climb = (1, 16001, 32001, 40004)  # each jump within the allowed counter gap
    assert rekey_then("state_lost", tmp_path, broker, pty, subscriber, old_key_counters=climb) == 0


def test_two_starts_reading_retained_states_at_once_do_not_take_each_others_session(broker):
    """Each start's recovery session has an id of its own: with one fixed id the broker drops the
    older session, and that start waits out its timeout and trusts no counter from the broker."""
    from concurrent.futures import ThreadPoolExecutor
    from binlink.gateway.retained import retained_states
    cfg = config.parse({"gateway": {"id": "g", "site": "s", "registry": "r", "state_dir": "d"},
                        "source": [{"port": "/x"}], "mqtt": {"host": "127.0.0.1", "port": broker.port}})
    publish_retained(broker.port, [("%s/bin/bin-x/state" % cfg.base_topic, b"{}")])
    squatter = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="%s-recovery" % cfg.client_id)
    squatter.connect("127.0.0.1", broker.port)
    squatter.loop_start()
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: retained_states(cfg, 10), range(4)))
        assert answers == [[("bin-x", b"{}")]] * 4
        assert squatter.is_connected()
    finally:
        squatter.disconnect()
        squatter.loop_stop()
