"""The wire codec on CPython: test vectors, round trips, and rejection of every corruption."""
import json

import pytest
from hypothesis import given, strategies as st

from binlink.wire import codec as c
from tests.conftest import VECTORS

KEY = bytes(range(16))  # TEST KEY

keys = st.binary(min_size=16, max_size=16)
device_ids = st.integers(0, c.MAX_DEVICE_ID)
fcnts = st.integers(0, c.MAX_FCNT)
distances = st.one_of(st.none(), st.integers(0, 0xFFFE))
temps = st.one_of(st.none(), st.integers(-127, 127))
batteries = st.integers(2000, 4550).map(lambda mv: mv - mv % 10)
flags = st.integers(0, 0x7F)
nibbles = st.integers(0, 15)


def test_enough_vectors_of_every_kind():
    types = {v["decoded"]["type"] for v in VECTORS if "decoded" in v}
    reasons = {v["reject"] for v in VECTORS if "reject" in v}
    assert len(VECTORS) >= 20
    assert types == {"reading", "backlog", "hello"}
    assert {"bad_tag", "truncated", "bad_version", "bad_type", "replay", "bad_length"} <= reasons


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector(v):
    key = bytes.fromhex(v["key_hex"])
    frame = bytes.fromhex(v["frame_hex"])
    if "decoded" in v:
        assert c.decode(frame, key, v.get("last_fcnt")) == v["decoded"]
    else:
        with pytest.raises(c.ProtocolError) as e:
            c.decode(frame, key, v.get("last_fcnt"))
        assert e.value.reason == v["reject"]


def test_vectors_file_matches_the_codec():
    """The committed vectors are what the codec produces now: a format change must regenerate them."""
    from tests.vectors import make_vectors

    assert json.loads(json.dumps(make_vectors.build())) == VECTORS


def test_reading_frame_is_at_most_16_bytes():
    f = c.encode_reading(KEY, c.MAX_DEVICE_ID, c.MAX_FCNT, 0xFFFE, -40, 4550, 0x7F, 15, 15)
    assert len(f) <= 16


@given(keys, device_ids, fcnts, distances, temps, batteries, flags, nibbles, nibbles)
def test_reading_round_trip(key, dev, fcnt, dist, temp, batt, fl, valid, pings):
    f = c.encode_reading(key, dev, fcnt, dist, temp, batt, fl, valid, pings)
    last = fcnt - 1 if fcnt else None
    d = c.decode(f, key, last)
    assert (d["type"], d["device_id"], d["fcnt"]) == ("reading", dev, fcnt)
    assert (d["distance_mm"], d["temperature_c"], d["battery_mv"]) == (dist, temp, batt)
    assert c.flag_bits(d["flags"]) == fl
    assert (d["valid_pings"], d["pings"]) == (valid, pings)


entries = st.lists(
    st.tuples(st.integers(1, 255), st.integers(0, 0xFFFF), distances, temps, batteries, flags, nibbles, nibbles),
    min_size=1, max_size=20, unique_by=lambda e: e[0],
)


@given(keys, device_ids, st.integers(255, c.MAX_FCNT), entries)
def test_backlog_round_trip(key, dev, fcnt, es):
    f = c.encode_backlog(key, dev, fcnt, [(fcnt - e[0], e[1], c.pack_reading(*e[2:])) for e in es])
    d = c.decode(f, key, fcnt - 1)
    assert d["type"] == "backlog" and d["fcnt"] == fcnt and len(d["readings"]) == len(es)
    for r, e in zip(d["readings"], es):
        assert r["fcnt"] == fcnt - e[0] and r["age_min"] == e[1]
        assert (r["distance_mm"], r["temperature_c"], r["battery_mv"]) == e[2:5]
        assert c.flag_bits(r["flags"]) == e[5]


@given(keys, device_ids, fcnts, st.tuples(nibbles, nibbles, nibbles), st.integers(0, 6), st.binary(min_size=4, max_size=4))
def test_hello_round_trip(key, dev, fcnt, ver, cause, chash):
    d = c.decode(c.encode_hello(key, dev, fcnt, ver, cause, chash), key, fcnt - 1 if fcnt else None)
    assert d["fw_version"] == "%d.%d.%d" % ver
    assert d["reset_cause"] == c.RESET_CAUSES[cause]
    assert d["config_hash"] == chash.hex() and d["device_id"] == dev


@st.composite
def any_frame(draw):
    key = draw(keys)
    kind = draw(st.sampled_from(["reading", "backlog", "hello"]))
    dev, fcnt = draw(device_ids), draw(st.integers(255, c.MAX_FCNT))
    if kind == "reading":
        f = c.encode_reading(key, dev, fcnt, draw(distances), draw(temps), 3600, draw(flags), 5, 5)
    elif kind == "backlog":
        f = c.encode_backlog(key, dev, fcnt, [(fcnt - 2, 9, c.pack_reading(900, 11, 3600)), (fcnt - 1, 5, c.pack_reading(1000, 10, 3600))])
    else:
        f = c.encode_hello(key, dev, fcnt, (1, 0, 0), 1, b"abcd")
    return key, f, fcnt


@given(any_frame(), st.data())
def test_any_bit_flip_is_rejected(kf, data):
    key, f, fcnt = kf
    nbits = data.draw(st.integers(1, 3))
    b = bytearray(f)
    for pos in data.draw(st.lists(st.integers(0, len(f) * 8 - 1), min_size=nbits, max_size=nbits, unique=True)):
        b[pos // 8] ^= 1 << (pos % 8)
    with pytest.raises(c.ProtocolError):
        c.decode(bytes(b), key, fcnt - 1)


@given(st.binary(max_size=64), keys, st.one_of(st.none(), st.integers(0, c.MAX_FCNT)))
def test_garbage_raises_only_protocol_errors(blob, key, last):
    try:
        c.decode(blob, key, last)
    except c.ProtocolError as e:
        assert e.reason in {"truncated", "bad_version", "bad_type", "bad_length", "bad_tag", "replay", "fcnt_gap"}


@given(st.integers(0, c.MAX_FCNT - 0x4000), st.integers(1, 0x4000))
def test_counter_reconstruction_from_low_16_bits(last, step):
    assert c.candidate_fcnt((last + step) & 0xFFFF, last) == last + step


@given(any_frame())
def test_replay_is_named_as_such(kf):
    key, f, fcnt = kf
    with pytest.raises(c.ProtocolError) as e:
        c.decode(f, key, fcnt)
    assert e.value.reason == "replay"


def test_pure_python_hmac_matches_the_standard_library(monkeypatch):
    import hashlib
    import hmac

    monkeypatch.setattr(c, "_hmac", None)
    for key in (b"", KEY, b"k" * 64, b"x" * 100):
        assert c.hmac_sha256(key, b"message") == hmac.new(key, b"message", hashlib.sha256).digest()
