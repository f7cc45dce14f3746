# Read by Cython only (simulator/compiled.py): the compiled Esp32's state in fixed slots.
cdef class Esp32:
    cdef dict __dict__
    cdef public object now_ms, rtc, nvs, nvs_pending, wdt_timeout, wdt_due, cause, wake, wake_ext0
    cdef public object pins, uarts, asleep, light, wifi_on
