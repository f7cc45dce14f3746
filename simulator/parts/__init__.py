"""Part models: each part behaves as its datasheet (or the MicroPython esp32 port's source) says,
at the level the firmware touches it — pin levels and timings, UART bytes at the configured baud,
AT replies and their timing, streaming sensors, current per state. Sources: docs/hardware.md."""
