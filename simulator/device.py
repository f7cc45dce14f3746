"""One simulated bin: physics + simulated hardware + the real firmware, run on CPython or on
the MicroPython VM, through the firmware's hardware module."""
import json

from binlink.wire import codec

from binlink.firmware import app, config
from binlink.sim import physics
from binlink.sim.hardware import SimHardware, frames_in

RADIO_PORT = [1, 9600, 26, 27]
SENSOR_PORT = [2, 9600, 17, 16]


class SimDevice:
    def __init__(self, rng, device_id, key, clock, transmit=None, vm=None, depth_mm=1200, full_mm=250,
                 transport="e22", sensor="jsn-sr04t", weather=None, **overrides):
        self.device_id = device_id
        self.key = key
        self.clock = clock
        self.vm = vm  # a simulator.vm.FirmwareVM, or None for CPython
        self.bin = physics.Bin(rng, depth_mm=depth_mm, full_mm=full_mm, t0=clock())
        self.sensor = physics.UltrasonicSensor(rng)
        self.battery = physics.Battery()
        self.sent = []  # (time, payload bytes as the module put them on air)
        self.truth = {}  # fcnt -> (true fill %, true surface mm) when that reading was measured
        self._transmit = transmit
        self.hw = SimHardware(self.bin, self.sensor, weather or physics.Weather(), self.battery, RADIO_PORT,
                              SENSOR_PORT, self._on_transmit, clock)
        self.cfg_dict = {
            "device_id": device_id, "key": key.hex(), "transport": transport, "sensor": sensor,
            "depth_mm": depth_mm, "full_mm": full_mm, "radio_uart": RADIO_PORT, "sensor_uart": SENSOR_PORT,
            "tilt_pin": 33,
        }
        self.cfg_dict.update(overrides)
        self.raw_config = json.dumps(self.cfg_dict, sort_keys=True).encode()
        self.cfg, self.chash, problems = config.parse(json.loads(self.raw_config), self.raw_config)
        if problems:
            raise ValueError("simulated device config: %s" % "; ".join(problems))
        self.fuel = []
        self._last_fcnt = None
        self.frames_sent = 0

    def _on_transmit(self, payload, on_air_len):
        frames = frames_in(payload)
        self.frames_sent += len(frames)
        for f in frames:
            fcnt = codec.verify(f, self.key, self._last_fcnt)  # the device's own frames: always newer
            self._last_fcnt = fcnt
            if f[0] & 0x0F == codec.T_READING and self.hw.last_true is not None:
                self.truth[fcnt] = self.hw.last_true
        self.sent.append((self.clock(), payload))
        return self._transmit(self, payload, on_air_len) if self._transmit else True

    def wake(self):
        """One wake cycle at the current simulated time; returns seconds until the next wake."""
        self.hw.awake_ms = 0.0
        self.hw.last_true = None
        if self.vm is not None:
            sleep, out = self.vm.run_cycle(self.hw, self.cfg_dict, self.raw_config)
            self.fuel.append(self.vm.last_fuel)
        else:
            sleep = app.run_cycle(self.hw, self.cfg, self.chash)
        self.hw.charge_cycle(0)
        self.hw.cause = 4  # the next start is a wake from deep sleep
        return sleep

    def frames(self):
        """Every protocol frame this device put on air, in order."""
        return [f for _, p in self.sent for f in frames_in(p)]
