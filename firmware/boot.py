# Safe-mode window. After power-on or the EN button (not after a deep-sleep wake, so the battery
# never pays for it) the board waits 2 s before main.py starts the watchdog: Ctrl-C from the
# technician's tool (`make flash`) or the BOOT button held lands here, main.py is skipped and the
# REPL stays open for re-flashing. An exception in boot.py is what makes MicroPython skip main.py.
import machine
import time

if machine.reset_cause() != machine.DEEPSLEEP_RESET:
    _boot_button = machine.Pin(0, machine.Pin.IN, machine.Pin.PULL_UP)
    for _ in range(40):
        if _boot_button.value() == 0:
            raise RuntimeError("safe mode: BOOT button held, main.py not started")
        time.sleep_ms(50)
