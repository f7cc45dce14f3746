# Safe-mode window. After power-on or the EN button (not after a deep-sleep wake, so the battery
# never pays for it) the board waits 2 s before main.py starts the watchdog: Ctrl-C from the
# technician's tool (`make flash`) or the BOOT button held lands here, main.py is skipped and the
# REPL stays open for re-flashing. An exception in boot.py is what makes MicroPython skip main.py.
# Not after a reset that kept RTC memory (a brown-out is reported as a power-on, a watchdog reset
# as itself): the EN button and a power cut clear it, and a cell sagging under the radio must not
# pay 2 s at ~40 mA for every brown-out.
import machine
import time

if machine.reset_cause() != machine.DEEPSLEEP_RESET and bytes(machine.RTC().memory())[:2] != b"BL":
    _boot_button = machine.Pin(0, machine.Pin.IN, machine.Pin.PULL_UP)
    for _ in range(40):
        if _boot_button.value() == 0:
            raise RuntimeError("safe mode: BOOT button held, main.py not started")
        time.sleep_ms(50)
