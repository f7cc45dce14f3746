"""Serial framing: COBS + CRC-16 resynchronises after noise, fed in any chunking."""
import pytest
from hypothesis import given, strategies as st

from binlink.wire import framing as fr

payloads = st.binary(min_size=1, max_size=200)


@given(st.binary(max_size=600))
def test_cobs_round_trip_and_no_zero_bytes(data):
    enc = fr.cobs_encode(data)
    assert 0 not in enc
    assert fr.cobs_decode(enc) == data


def _feed_chunked(d, stream, cuts):
    out = []
    pos = 0
    for cut in sorted(cuts) + [len(stream)]:
        out += d.feed(stream[pos:cut])
        pos = cut
    return out


@given(st.lists(payloads, min_size=1, max_size=8), st.data())
def test_frames_survive_any_chunking(frames, data):
    stream = b"".join(fr.frame(p) for p in frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    got = _feed_chunked(fr.Deframer(), stream, cuts)
    assert got == [("frame", p, None) for p in frames]


@given(st.lists(st.tuples(st.binary(max_size=40), payloads), min_size=1, max_size=6), st.data())
def test_resync_after_garbage_between_frames(items, data):
    """Garbage (delimiter-terminated or not) before a frame costs at most that frame; later frames pass."""
    stream = b""
    for junk, p in items:
        stream += junk + b"\x00" + fr.frame(p)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    got = _feed_chunked(fr.Deframer(), stream, cuts)
    frames = [b for k, b, _ in got if k == "frame"]
    assert frames == [p for _, p in items]
    assert all(k in ("frame", "crc", "oversize") for k, _, _ in got)


@given(payloads, payloads, st.data())
def test_a_damaged_frame_costs_only_itself(p1, p2, data):
    """A frame cut, with a byte dropped or a bit flipped, never takes the next frame with it. The
    damaged one is rejected by its CRC — except by chance (CRC-16: about 1 in 65,536 damaged frames
    pass; hypothesis finds such cases), which is why a binlink frame also carries its tag (below)."""
    w1 = bytearray(fr.frame(p1))
    mode = data.draw(st.sampled_from(["drop", "flip", "cut"]))
    i = data.draw(st.integers(0, len(w1) - 2))
    if mode == "drop":
        del w1[i]
    elif mode == "flip":
        w1[i] ^= 1 << data.draw(st.integers(0, 7))
    else:
        w1 = w1[:i]
    got = fr.Deframer().feed(bytes(w1) + fr.frame(p2))
    frames = [b for k, b, _ in got if k == "frame"]
    assert frames[-1] == p2 and len(frames) <= 2


@given(st.integers(0, 0xFFFFFF), st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF), st.data())
def test_a_damaged_binlink_frame_that_passes_the_crc_still_fails_its_tag(device_id, fcnt, distance, data):
    from binlink.wire import codec

    key = bytes(range(16))  # TEST KEY
    original = codec.encode_reading(key, device_id, fcnt, distance, 20, 3700)
    w = bytearray(fr.frame(original))
    i = data.draw(st.integers(1, len(w) - 2))  # inside the frame, delimiters excluded
    if data.draw(st.booleans()):
        del w[i]
    else:
        w[i] ^= 1 << data.draw(st.integers(0, 7))
    for kind, payload, _ in fr.Deframer().feed(bytes(w)):
        if kind == "frame" and payload != original:
            with pytest.raises(codec.ProtocolError):
                codec.verify(payload, key, None)


def _reference(stream, limit):
    """What a deframer must report for a whole stream: each block between delimiters, checked,
    or one "oversize" (its first 16 bytes) when longer than the limit — also an unended last one."""
    blocks = stream.split(b"\x00")
    out = []
    for i, block in enumerate(blocks):
        ended = i < len(blocks) - 1
        if len(block) > limit:
            out.append(("oversize", block[:16], None))
        elif ended and block:
            out.append(fr._check(block) + (None,))
    return out


chunks = st.one_of(st.binary(max_size=30), st.binary(min_size=250, max_size=300), st.just(b"\x00"),
                   payloads.map(fr.frame))


@given(st.lists(chunks, max_size=12).map(b"".join), st.data())
def test_any_byte_stream_in_any_chunking_gives_what_its_blocks_say(stream, data):
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    d = fr.Deframer()
    assert _feed_chunked(d, stream, cuts) == _reference(stream, d._limit)


def test_oversize_run_without_delimiter_is_dropped():
    d = fr.Deframer()
    got = d.feed(b"\x01" * 1000)
    assert got and got[0][0] == "oversize"
    assert d.feed(b"\x00" + fr.frame(b"ok")) == [("frame", b"ok", None)]
    assert d.pending() == 0


def test_crc_matches_ccitt_false_check_value():
    assert fr.crc16(b"123456789") == 0x29B1


@given(st.lists(st.tuples(payloads, st.integers(1, 255)), min_size=1, max_size=6), st.data())
def test_trailer_byte_follows_each_frame(items, data):
    """E22 with RSSI enabled: one byte after each packet, in any chunking."""
    stream = b"".join(fr.frame(p) + bytes([r]) for p, r in items)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    got = _feed_chunked(fr.Deframer(trailer=True), stream, cuts)
    assert got == [("frame", p, r) for p, r in items]


@given(st.binary(max_size=600))
def test_framed_len_is_what_frame_writes(payload):
    """The firmware books airtime with framed_len(): exact for any protocol frame (< 252 bytes),
    never an underestimate beyond."""
    n = len(fr.frame(payload))
    if len(payload) <= 251:
        assert fr.framed_len(len(payload)) == n
    else:
        assert fr.framed_len(len(payload)) >= n
