# The wire protocol: one source for the firmware (MicroPython) and the gateway (CPython).
