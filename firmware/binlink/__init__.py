# binlink firmware package: shared by the ESP32 firmware (MicroPython) and the gateway (CPython).
