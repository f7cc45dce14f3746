"""Module formats: raw, raw+rssi (E22) and RYLR998 AT lines, fed in any chunking, with noise."""
import pytest
from hypothesis import given, strategies as st

from binlink.wire import framing
from binlink.gateway import module_formats as mf

frames = st.lists(st.binary(min_size=10, max_size=60), min_size=1, max_size=6)


def feed_chunked(fmt, stream, cuts):
    out, pos = [], 0
    for cut in sorted(cuts) + [len(stream)]:
        out += fmt.feed(stream[pos:cut])
        pos = cut
    return out


@given(frames, st.data())
def test_raw(fs, data):
    stream = b"".join(framing.frame(f) for f in fs)
    got = feed_chunked(mf.make("raw"), stream, data.draw(st.lists(st.integers(0, len(stream)))))
    assert [r.frame for r in got] == fs


@given(st.lists(st.tuples(st.binary(min_size=10, max_size=60), st.integers(0, 255)), min_size=1, max_size=6), st.data())
def test_raw_rssi(items, data):
    stream = b"".join(framing.frame(f) + bytes([r]) for f, r in items)
    got = feed_chunked(mf.make("raw+rssi"), stream, data.draw(st.lists(st.integers(0, len(stream)))))
    # a byte of 0 would be -256 dBm, which no receiver reports (docs/protocol.md): unknown
    assert [(r.frame, r.rssi) for r in got] == [(f, -(256 - r) if r else None) for f, r in items]


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=120), st.integers(-140, -20), st.integers(-20, 15)), min_size=1, max_size=5),
       st.data())
def test_rylr998_lines_with_status_lines_between(items, data):
    stream = b"+READY\r\n"
    for f, rssi, snr in items:
        stream += mf.rylr998_line(f, addr=7, rssi=rssi, snr=snr) + b"+OK\r\n"
    got = feed_chunked(mf.make("rylr998"), stream, data.draw(st.lists(st.integers(0, len(stream)))))
    received = [r for r in got if r.frame is not None]
    assert [(r.frame, r.rssi, r.snr) for r in received] == [(f, rssi, float(snr)) for f, rssi, snr in items]
    assert {r.reason for r in got if r.frame is None} == {"status"}


@given(st.binary(max_size=300))
def test_garbage_never_raises_in_any_format(blob):
    for name in mf.FORMATS:
        for r in mf.make(name).feed(blob):
            assert (r.frame is None) == (r.reason is not None)


@pytest.mark.parametrize("line,reason", [
    (b"+RCV=1,4,ABC,-50,9\r\n", "truncated"),
    (b"+RCV=1,4,ZZZZ,-50,9\r\n", "bad_line"),
    (b"+RCV=1,4\r\n", "bad_line"),
    (b"+RCV=x,2,AB,-50,9\r\n", "bad_line"),
    (b"+RCV=1,2,AB,-99999,9\r\n", "bad_line"),  # no receiver reports that: a garbled line
    (b"+RCV=1,2,AB,-50,nan\r\n", "bad_line"),
    (b"+RCV=1,2,AB,-50,1e9\r\n", "bad_line"),
    (b"+ERR=13\r\n", "module_error"),
    (b"hello\r\n", "bad_line"),
    (b"\xff\xfe\r\n", "bad_line"),
])
def test_rylr998_bad_lines_have_reasons(line, reason):
    (r,) = mf.make("rylr998").feed(line)
    assert r.frame is None and r.reason == reason


def test_rylr998_data_with_commas_is_split_on_the_last_two():
    # another sender's ASCII data may hold commas: addr and length are the first two fields, rssi
    # and snr the last two. Split so, the 5 data characters match the length and the line is
    # refused only because it is not our hex; split anywhere else, length or rssi would not parse.
    (r,) = mf.make("rylr998").feed(b"+RCV=12,5,A,B,C,-101,-3.5\r\n")
    assert (r.frame, r.reason, r.detail) == (None, "bad_line", "data is not hex")
    (r,) = mf.make("rylr998").feed(b"+RCV=12,4,0A0B,-101,-3.5\r\n")
    assert (r.frame, r.rssi, r.snr) == (b"\x0a\x0b", -101, -3.5)


def test_rylr998_overlong_line_is_dropped_then_resyncs():
    fmt = mf.make("rylr998")
    got = fmt.feed(b"A" * 2000) + fmt.feed(b"BBB\r\n" + mf.rylr998_line(b"\x01\x02"))
    assert [r.reason for r in got] == ["oversize", None]
    assert got[-1].frame == b"\x01\x02"


def test_unknown_format_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown module format 'lorawan'"):
        mf.make("lorawan")
