"""`time_synced` from the kernel's clock state (adjtimex), so it holds with chrony, ntpd and
systemd-timesyncd alike: the parse of the kernel's answer, and the call on this machine."""
from hypothesis import given, strategies as st

from binlink.gateway import clock

# adjtimex's return values (linux/timex.h): TIME_OK, TIME_INS, TIME_DEL, TIME_OOP, TIME_WAIT, TIME_ERROR
STATES = st.integers(min_value=0, max_value=5)


@given(STATES, st.integers(min_value=0, max_value=0xFFFF), st.integers(min_value=-1, max_value=2**40))
def test_synced_only_when_the_kernel_says_so_on_every_count(state, status, maxerror):
    assert clock.synced((state, status, maxerror)) == (
        state != clock.TIME_ERROR and not status & clock.STA_UNSYNC and 0 <= maxerror < 16_000_000)


def test_what_chrony_timesyncd_and_an_unsynced_boot_leave_in_the_kernel():
    assert clock.synced((0, 0x2001, 48_500))  # chrony: STA_PLL | STA_NANO, maxerror tens of ms
    assert clock.synced((0, 0x0000, 16_000))  # systemd-timesyncd: no status bits, maxerror set at each sync
    assert clock.synced((1, 0x0011, 1_000))  # a leap second announced (TIME_INS, STA_INS) is still synced
    assert not clock.synced((5, 0x0040, 16_000_000))  # booted, no NTP client yet: STA_UNSYNC, TIME_ERROR
    assert not clock.synced((0, 0x2001, 16_000_000))  # a client that stopped: maxerror grew past 16 s
    assert not clock.synced(None)  # the kernel could not be asked


def test_the_kernel_is_asked_here_and_its_answer_read_at_the_right_offsets():
    answer = clock.kernel_clock()
    assert answer is not None, "adjtimex/ntp_adjtime not found in libc"
    state, status, maxerror = answer
    assert 0 <= state <= 5 and 0 <= status <= 0xFFFF and maxerror >= 0
    if status & clock.STA_UNSYNC:  # the kernel answers TIME_ERROR whenever STA_UNSYNC is set
        assert state == clock.TIME_ERROR
    assert clock.clock_synced() == clock.synced(answer)
