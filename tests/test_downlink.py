"""The downlink's wire format (binlink.wire.downlink, docs/protocol.md "Downlink"): vectors on
CPython and on the MicroPython VM, and the properties that make it safe to send on air."""
import json
import os

from hypothesis import given, settings, strategies as st

from binlink.wire import codec
from binlink.wire import downlink as d

VECTORS = json.load(open(os.path.join(os.path.dirname(__file__), "vectors", "downlink.json")))
KEY = bytes(range(16))  # TEST KEY
OTHER_KEY = bytes([7]) * 16  # TEST KEY


def _outcome(v, parse):
    try:
        got = parse(bytes.fromhex(v["frame_hex"]), bytes.fromhex(v["key_hex"]), v["device_id"], v["answered_fcnt"])
    except codec.ProtocolError as e:
        return {"reject": e.reason}
    return {"parsed": {k: (val if k != "config" else [val[0].hex(), val[1]]) for k, val in got.items()}}


def test_every_vector_parses_as_pinned():
    for v in VECTORS:
        want = {"reject": v["reject"]} if "reject" in v else {"parsed": v["parsed"]}
        assert _outcome(v, d.parse) == want, v["name"]


def test_vectors_file_matches_the_codec():
    """The committed vectors are what the codec encodes now: a format change must regenerate them."""
    from tests.vectors import make_downlink_vectors

    assert json.loads(json.dumps(make_downlink_vectors.build())) == VECTORS


def test_every_vector_parses_the_same_on_micropython(mpy_session):
    code = (
        "import json\n"
        "from binlink.wire import codec, downlink\n"
        "out = []\n"
        "for v in json.loads(%r):\n"
        "    try:\n"
        "        got = downlink.parse(bytes.fromhex(v['frame_hex']), bytes.fromhex(v['key_hex']), v['device_id'], v['answered_fcnt'])\n"
        "        if 'config' in got:\n"
        "            got['config'] = [got['config'][0].hex(), got['config'][1]]\n"
        "        out.append({'parsed': got})\n"
        "    except codec.ProtocolError as e:\n"
        "        out.append({'reject': e.reason})\n"
        "print(json.dumps(out))\n"
    ) % json.dumps(VECTORS)
    got = json.loads(mpy_session.run(code).stdout)
    for v, g in zip(VECTORS, got):
        assert g == ({"reject": v["reject"]} if "reject" in v else {"parsed": v["parsed"]}), v["name"]
    assert len(got) == len(VECTORS)


SETTING = st.sampled_from(sorted(d.SETTINGS)).flatmap(
    lambda i: st.tuples(st.just(d.SETTINGS[i][0]), st.integers(d.SETTINGS[i][1], d.SETTINGS[i][2])))
CONTENT = st.fixed_dictionaries({}, optional={
    "ack": st.integers(0, 0xFFFFFFFF),
    "time_ms": st.integers(0, 0xFFFFFFFF * 1000 + 999),
    "config": st.tuples(st.binary(min_size=4, max_size=4), st.lists(SETTING, min_size=1, max_size=d.MAX_SETTINGS,
                                                                     unique_by=lambda s: s[0]).map(dict)),
    "pace_min": st.integers(*d.PACE_MIN),
    "echo": st.integers(0, codec.ECHO_MAX),
}).filter(bool).filter(lambda c: not d.setting_problems(c.get("config", (b"", {}))[1])).filter(
    lambda c: 10 + 5 * ("ack" in c) + 7 * ("time_ms" in c) + 3 * ("pace_min" in c) + 2 * ("echo" in c)
    + (6 + 5 * len(c["config"][1]) if "config" in c else 0) <= d.MAX_LEN)  # what fits one answer


@settings(max_examples=300)
@given(CONTENT, st.integers(0, codec.MAX_DEVICE_ID), st.integers(0, codec.MAX_FCNT))
def test_what_the_gateway_encodes_the_bin_parses_back_and_only_in_that_window(content, device, answered):
    frame = d.encode(KEY, device, answered, **content)
    assert len(frame) <= d.MAX_LEN
    assert d.parse(frame, KEY, device, answered) == content
    for later in (answered + 1, answered + 0x10000):  # a recorded downlink in any later window
        if later <= codec.MAX_FCNT:
            try:
                d.parse(frame, KEY, device, later)
                raise AssertionError("a downlink for uplink %d verified for %d" % (answered, later))
            except codec.ProtocolError as e:
                assert e.reason == "bad_tag"


@settings(max_examples=300)
@given(CONTENT, st.data())
def test_any_changed_byte_or_another_key_is_refused(content, data):
    frame = d.encode(KEY, 0xA1, 5000, **content)
    at = data.draw(st.integers(0, len(frame) - 1))
    bit = data.draw(st.integers(0, 7))
    hurt = frame[:at] + bytes([frame[at] ^ (1 << bit)]) + frame[at + 1:]
    for f, key in ((hurt, KEY), (frame, OTHER_KEY)):
        try:
            d.parse(f, key, 0xA1, 5000)
            raise AssertionError("accepted")
        except codec.ProtocolError:
            pass


@given(st.binary(max_size=80), st.integers(0, codec.MAX_DEVICE_ID), st.integers(0, codec.MAX_FCNT))
def test_any_bytes_are_refused_with_a_reason_never_an_exception(raw, device, answered):
    try:
        d.parse(raw, KEY, device, answered)
    except codec.ProtocolError as e:
        assert e.reason in ("truncated", "bad_length", "bad_version", "bad_type", "not_mine", "bad_tag",
                            "bad_command", "bad_setting")


@given(st.integers(0, codec.MAX_FCNT), st.integers(1, 200))
def test_uplinks_and_downlinks_never_verify_as_each_other(fcnt, distance):
    """Reflection: the same key, counter and bytes, but another type and a key for each direction."""
    up = codec.encode_reading(KEY, 0xA1, fcnt, distance, 20, 3700)
    try:
        d.parse(up, KEY, 0xA1, fcnt)
        raise AssertionError("an uplink parsed as a downlink")
    except codec.ProtocolError as e:
        assert e.reason in ("bad_type", "bad_length")
    down = d.encode(KEY, 0xA1, fcnt, ack=1)
    try:
        codec.decode(down, KEY)
        raise AssertionError("a downlink decoded as an uplink")
    except codec.ProtocolError as e:
        assert e.reason in ("bad_type", "bad_length", "bad_tag")
    assert d.direction_key(KEY) != KEY


def test_the_gateway_refuses_what_the_bin_would():
    for bad in ({"fire_c": 200}, {"report_s": 10}, {"wifi_password": 1}, {"near_full_pct": True},
                {"wake_s": 900, "report_s": 600}):
        assert d.setting_problems(bad)
        try:
            d.encode(KEY, 0xA1, 1, config=(d.settings_hash(bad), bad))
            raise AssertionError("encoded %r" % bad)
        except ValueError:
            pass
    good = {"report_s": 1800, "wake_s": 600}
    assert not d.setting_problems(good)
    assert d.settings_hash(good) == d.settings_hash(dict(reversed(list(good.items()))))  # order does not matter
    assert d.settings_hash(good) != d.settings_hash({"report_s": 1800, "wake_s": 601})
