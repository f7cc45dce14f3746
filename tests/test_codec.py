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


@given(keys, device_ids, st.integers(255, c.MAX_FCNT), entries.map(lambda es: sorted(es[:c.ECHO_MAX], reverse=True)),
       distances, temps, batteries, flags)
def test_echo_round_trip(key, dev, fcnt, es, dist, temp, batt, fl):
    """A reading of version 1 + n: its n echoes, then itself (oldest first, as a batch's readings)."""
    f = c.encode_reading_body(key, dev, fcnt, c.pack_reading(dist, temp, batt, fl, 5, 5),
                              [(fcnt - e[0], e[1], c.pack_reading(*e[2:])) for e in es])
    assert len(f) == 16 + 9 * len(es)
    d = c.decode(f, key, fcnt - 1)
    assert (d["type"], d["version"], d["fcnt"], d["distance_mm"], d["temperature_c"]) == ("reading", 1 + len(es), fcnt, dist, temp)
    for echo, e in zip(d["echoes"], es):
        assert (echo["fcnt"], echo["age_min"], echo["distance_mm"], echo["temperature_c"], echo["battery_mv"]) == (fcnt - e[0],) + e[1:5]
        assert c.flag_bits(echo["flags"]) == e[5]
    assert [r[0] for r in c.readings(f, fcnt)] == [fcnt - e[0] for e in es] + [fcnt]


def test_a_reading_frame_repeats_at_most_echo_max_readings():
    body = c.pack_reading(700, 20, 3700)
    with pytest.raises(ValueError):
        c.encode_reading_body(KEY, 1, 500, body, [(500 - k, k, body) for k in range(1, c.ECHO_MAX + 2)])


@given(keys, device_ids, fcnts, st.tuples(nibbles, nibbles, nibbles), st.integers(0, 6), st.binary(min_size=4, max_size=4))
def test_hello_round_trip(key, dev, fcnt, ver, cause, chash):
    d = c.decode(c.encode_hello(key, dev, fcnt, ver, cause, chash), key, fcnt - 1 if fcnt else None)
    assert d["fw_version"] == "%d.%d.%d" % ver
    assert d["reset_cause"] == c.RESET_CAUSES[cause]
    assert d["config_hash"] == chash.hex() and d["device_id"] == dev


@st.composite
def any_frame(draw):
    key = draw(keys)
    kind = draw(st.sampled_from(["reading", "echo", "backlog", "hello"]))
    dev, fcnt = draw(device_ids), draw(st.integers(255, c.MAX_FCNT))
    if kind == "reading":
        f = c.encode_reading(key, dev, fcnt, draw(distances), draw(temps), 3600, draw(flags), 5, 5)
    elif kind == "echo":
        f = c.encode_reading_body(key, dev, fcnt, c.pack_reading(draw(distances), 20, 3600), [(fcnt - draw(st.integers(1, 255)),
                                  draw(st.integers(0, 0xFFFF)), c.pack_reading(draw(distances), draw(temps), 3600, draw(flags)))
                                  for _ in range(draw(st.integers(1, c.ECHO_MAX)))])
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


@pytest.mark.parametrize("copied", [True, False], ids=["cpython-copied-states", "micropython-no-copy"])
@given(key=st.binary(max_size=100), msg=st.binary(max_size=300))
def test_hmac_matches_the_standard_library(copied, key, msg):
    """Both ways the codec computes HMAC-SHA256: from cached key states (CPython) and from scratch
    (MicroPython, whose hash objects cannot be copied); a cached state must never be changed by use."""
    import hmac

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(c, "_COPY", copied)
        for _ in range(2):
            assert c.hmac_sha256(key, msg) == hmac.digest(key, msg, "sha256")


# --- counter resynchronisation (version 2 hello) -------------------------------------------------

@given(keys, device_ids, fcnts, st.one_of(st.none(), fcnts))
def test_hello_names_its_full_counter_whatever_the_gateway_knew(key, dev, fcnt, last):
    """A version 2 hello verifies with the counter it carries, however far it is from last
    (no 16-bit reconstruction, no gap limit), and is a replay when not above last."""
    f = c.encode_hello(key, dev, fcnt, (1, 1, 0), 4, b"abcd")
    assert c.explicit_fcnt(f) == fcnt and len(f) == 20
    if last is not None and fcnt <= last:
        with pytest.raises(c.ProtocolError) as e:
            c.verify(f, key, last)
        assert e.value.reason == "replay" and e.value.fcnt == fcnt
    else:
        assert c.decode(f, key, last)["fcnt"] == fcnt


@given(keys, device_ids, fcnts, st.integers(0, 31), st.integers(0, 15))
def test_hello_counter_bits_are_authenticated(key, dev, fcnt, byte, bit):
    """Any changed bit, the high counter bits on air included, fails the tag (or the parse)."""
    f = bytearray(c.encode_hello(key, dev, fcnt, (1, 1, 0), 4, b"abcd"))
    f[byte % len(f)] ^= 1 << (bit % 8)
    with pytest.raises(c.ProtocolError):
        c.verify(bytes(f), key, None)


@given(keys, device_ids, st.integers(0x10000, c.MAX_FCNT), st.integers(1, 0xFFFF), st.data())
def test_frames_held_before_a_hello_verify_against_its_counter(key, dev, anchor, back, data):
    fcnt = anchor - back
    f = c.encode_reading(key, dev, fcnt, 900, 20, 3700, 0, 5, 5)
    assert c.verify_before(f, key, anchor) == fcnt
    floor = data.draw(st.integers(0, c.MAX_FCNT))
    if floor >= fcnt:
        with pytest.raises(c.ProtocolError) as e:
            c.verify_before(f, key, anchor, floor)
        assert e.value.reason == "replay"
    else:
        assert c.verify_before(f, key, anchor, floor) == fcnt


@given(keys, device_ids, fcnts, st.integers(0, c.MAX_FCNT))
def test_frame_sent_after_the_anchor_is_not_taken_for_an_earlier_one(key, dev, fcnt, anchor):
    """verify_before only names counters below the anchor: a later frame's tag does not verify
    with an earlier counter (bad_tag), so a held frame cannot be placed in the wrong epoch."""
    f = c.encode_reading(key, dev, fcnt, 900, 20, 3700, 0, 5, 5)
    if anchor - 0xFFFF <= fcnt < anchor:
        assert c.verify_before(f, key, anchor) == fcnt
    else:
        with pytest.raises(c.ProtocolError) as e:
            c.verify_before(f, key, anchor)
        assert e.value.reason == "bad_tag"


def test_a_version_1_gateway_rejects_the_new_hello_clearly():
    """The codec as it was before version 2 hellos (git history) names it bad_version."""
    import subprocess
    import types

    try:
        src = subprocess.run(["git", "show", "586f5af:firmware/binlink/wire/codec.py"], capture_output=True, text=True,
                             check=True, cwd=str(__import__("tests.conftest").conftest.ROOT)).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git history not available")
    old = types.ModuleType("old_codec")
    exec(compile(src, "old_codec.py", "exec"), old.__dict__)
    f = c.encode_hello(KEY, 0xA1, 70000, (1, 1, 0), 4, b"abcd")
    with pytest.raises(old.ProtocolError) as e:
        old.decode(f, KEY)
    assert e.value.reason == "bad_version" and "version 2" in e.value.detail
    v1 = c.encode_hello(KEY, 0xA1, 7, (1, 0, 0), 4, b"abcd", version=1)  # and old firmware still works here
    assert old.decode(v1, KEY)["fcnt"] == c.decode(v1, KEY)["fcnt"] == 7
