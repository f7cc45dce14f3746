# `time` on the simulated board: the board's clock, not the host's. Ticks never wrap in a simulation.
from _host import call


def ticks_ms():
    return call("ticks_us") // 1000


def ticks_us():
    return call("ticks_us")


def ticks_diff(a, b):
    return a - b


def ticks_add(a, b):
    return a + b


def sleep_us(us):
    call("sleep_us", int(us))


def sleep_ms(ms):
    call("sleep_us", int(ms * 1000))


def sleep(s):
    call("sleep_us", int(s * 1000000))


def time():
    return call("time")


def time_ns():
    return call("time_ns")
