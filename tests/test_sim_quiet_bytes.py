"""The board passes over a burst of UART bytes that only fill the E22's buffer in one loop
(Board._quiet_run, E22.quiet_bytes/take_bytes: issue 21). It must compute exactly what stepping
the clock byte by byte computes: the same answers, the same packets on air, bytes lost, charge and
passivation to the last bit, brown-outs and watchdog resets at the same byte. Two boards built
alike, one with the shortcut switched off, take the same random calls: mode switches mid-burst,
the wrong baud, sub-packets filling up (240 bytes on the E22, 58 on the E32), a watchdog biting
and a cold stored cell browning out while bytes are on the wire."""
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from binlink.sim import physics
from binlink.sim.device import SimDevice

KEY = bytes(range(16))  # TEST KEY
T0 = 1_790_000_000.0
M0, M1, AUX, UART = 25, 14, 13, 1

OPS = st.one_of(
    st.tuples(st.just("write"), st.integers(1, 300), st.integers(0, 2**32)),
    st.tuples(st.just("ticks"), st.integers(1, 2000)),  # calls that let time pass without stepping the parts
    st.tuples(st.just("mode"), st.integers(0, 1), st.integers(0, 1)),
    st.tuples(st.just("baud"), st.sampled_from([9600, 9600, 19200, 4800, 115200])),
    st.tuples(st.just("write"), st.integers(1, 300), st.integers(0, 2**32)),
    st.tuples(st.just("sleep"), st.sampled_from([5, 100, 1000, 3000, 20_000, 150_000, 700_000])),
    st.tuples(st.just("flush")),
    st.tuples(st.just("aux")),
    st.tuples(st.just("read")),
    st.tuples(st.just("wdt"), st.sampled_from([1000, 30_000, 30_000])),
    st.tuples(st.just("rail"), st.integers(0, 1)),
    st.tuples(st.just("wake")),
)


def _boards(transport, cold):
    kw = dict(transport=transport)
    if cold:
        kw.update(weather=physics.Weather(-20.0, 0.0), cell={"passivation": 1.0, "used_mah": 0.9 * 17000, "age_years": 8.0})
    boards = []
    for quiet in (True, False):
        d = SimDevice(random.Random(7), 0xA1, KEY, lambda: T0, **kw)
        d.hw.power_on(T0)
        if not quiet:
            d.hw._quiet = None
        boards.append(d.hw)
    return boards


def _call(hw, op):
    kind = op[0]
    if kind == "mode":
        return [hw.dispatch("pin_init", [M0, 3, -1, op[1], True]), hw.dispatch("pin_init", [M1, 3, -1, op[2], True])]
    if kind == "baud":
        return hw.dispatch("uart_init", [UART, op[1], 26, 27, 0, 256])
    if kind == "write":
        data = random.Random(op[2]).choice([bytes([0xC0, 0, 9]), b""]) + random.Random(op[2]).randbytes(op[1])
        return hw.dispatch("uart_write", [UART, data.hex()])
    if kind == "sleep":
        return hw.dispatch("sleep_us", [op[1]])
    if kind == "flush":
        return hw.dispatch("uart_flush", [UART])
    if kind == "aux":
        return hw.dispatch("pin_value", [AUX])
    if kind == "read":
        return hw.dispatch("uart_read", [UART, -1])
    if kind == "wdt":
        return hw.dispatch("wdt_init", [op[1]])
    if kind == "ticks":
        return [hw.dispatch("ticks_us", []) for _ in range(op[1])]
    if kind == "rail":
        return hw.dispatch("pin_init", [23, 3, -1, op[1], None])
    if hw.halted:
        hw.wake_up(hw.epoch() + 1.0)
        return hw.dispatch("uart_init", [UART, 9600, 26, 27, 0, 256])
    return None


def _state(hw):
    r = hw.radio
    return (hw.now, hw.charge_mAs, hw.battery.passivation, hw.brownouts, hw.halted, bytes(r.buf),
            [list(b) for b in r.inbound], r.lost_bytes, r.packets, r.mode, r.pending, r.last_rx, r.tx_until)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["e22", "e32"]), st.booleans(), st.lists(OPS, min_size=1, max_size=40))
def test_a_burst_passed_over_in_one_loop_computes_what_byte_by_byte_stepping_computes(transport, cold, ops):
    quick, slow = _boards(transport, cold)
    for op in (("baud", 9600), ("mode", 0, 0), ("sleep", 50_000)):  # from normal mode on
        _call(quick, op)
        _call(slow, op)
    for i, op in enumerate(ops):
        assert _call(quick, op) == _call(slow, op), (i, op)
        assert _state(quick) == _state(slow), (i, op)


def test_a_burst_on_the_wire_is_passed_over():
    """The shortcut is taken: a frame written and flushed in normal mode."""
    quick, slow = _boards("e22", False)
    taken = []
    real = quick._quiet_run
    quick._quiet_run = lambda now, end: taken.append(now) or real(now, end)
    for hw in (quick, slow):
        _call(hw, ("baud", 9600))
        _call(hw, ("mode", 0, 0))
        _call(hw, ("sleep", 60_000))
        _call(hw, ("write", 25, 1))
        _call(hw, ("flush",))
        _call(hw, ("sleep", 20_000))
    assert taken and _state(quick) == _state(slow)
    assert quick.radio.packets and len(quick.radio.packets[0][1]) in (25, 28)
