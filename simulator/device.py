"""One simulated bin: physics + the board's part models + the real firmware (its own hw.py),
run on CPython or on the MicroPython VM."""
import json
import random

from binlink.wire import codec, framing

from binlink.firmware import app, config
from binlink.sim import physics
from binlink.sim.parts import esp32 as chip
from binlink.sim.parts.board import Board

RADIO_PORT = None  # the firmware's default for the transport (RYLR998: 115200 baud)
SENSOR_PORT = [2, 9600, 17, 16]
MAX_RESETS = 5  # resets in a row before the simulation gives up on a wake (a reset loop)


class SimDevice:
    def __init__(self, rng, device_id, key, clock, transmit=None, vm=None, depth_mm=1200, full_mm=250,
                 transport="e22", sensor="jsn-sr04t", weather=None, profile="custom", cell=None,
                 timing="random", **overrides):
        """cell: keyword arguments for the Li-SOCl2 cell (parts/cell.py: used_mah, age_years,
        passivation); it sits in the bin, at the air's temperature."""
        self.device_id = device_id
        self.key = key
        self.clock = clock
        self.vm = vm  # a simulator.vm.FirmwareVM, or None for CPython
        # the bin's waste has randomness of its own: drawn from the sensor's stream, how it fills
        # would depend on how often it is measured (policy.py runs fixed rounds without measuring)
        self.bin = physics.Bin(random.Random(rng.getrandbits(64)), depth_mm=depth_mm, full_mm=full_mm, t0=clock())
        # blind zone: JSN-SR04T 23-25 cm (drawn per unit), A02YYUW 3 cm (DFRobot SEN0311), HC-SR04 2 cm
        self.sensor = physics.UltrasonicSensor(rng, blind_mm={"a02yyuw": 30.0, "hc-sr04": 20.0}.get(sensor))
        self.weather = weather or physics.Weather()
        self.battery = physics.Battery(temp_c=lambda: self.weather.air_c(self.clock()), **(cell or {}))
        self.sent = []  # (time, payload bytes as the module put them on air)
        self.tx_eirp_dbm = None  # the last packet's power on air (dBm e.i.r.p.)
        self.counters = []  # frame counter of every protocol frame put on air, in order
        self.truth = {}  # fcnt -> (true fill %, true surface mm) when that reading was measured
        self.last_true = None
        self._transmit = transmit
        self.cfg_dict = {
            "device_id": device_id, "key": key.hex(), "transport": transport, "sensor": sensor,
            "depth_mm": depth_mm, "full_mm": full_mm, "sensor_uart": SENSOR_PORT, "tilt_pin": 33,
        }
        self.cfg_dict.update(overrides)
        self.raw_config = json.dumps(self.cfg_dict, sort_keys=True).encode()
        self.cfg, self.chash, problems = config.parse(json.loads(self.raw_config), self.raw_config)
        if problems:
            raise ValueError("simulated device config: %s" % "; ".join(problems))
        self.hw = Board(self.cfg, self.battery, self._surface, lambda: self.weather.air_c(self.clock()), self.sensor,
                        self._on_air, rng, profile=profile, timing=timing)
        self.rtc_drift = None  # None: the RTC keeps true time asleep; else its clock (esp32.RcSlow, esp32.Xtal32k)
        self.fuel = []
        self.frames_sent = 0
        self.resets = 0
        self._booted = False
        self._framed = (None, ())  # the last payload taken apart (frames_in) and its frames

    def _surface(self):
        s = self.bin.surface_mm()
        self.last_true = (self.bin.true_fill_pct(), s)
        return s

    def _on_air(self, data, on_air_len, sf=0, bw=0, dbm=0):
        self.tx_eirp_dbm = dbm + self.cfg["antenna_dbi"]  # the module's power register, through the bin's antenna
        payload = bytes.fromhex(data.decode()) if self.cfg["transport"] == "rylr998" else bytes(data)
        frames = self.frames_in(payload)
        self.frames_sent += len(frames)
        for f in frames:
            try:
                fcnt = codec.verify(f, self.key, None)
            except codec.ProtocolError:
                continue  # cut short by a reset: the gateway drops it too
            self.counters.append(fcnt)
            if f[0] & 0x0F == codec.T_READING and self.last_true is not None:
                self.truth[fcnt] = self.last_true
        self.sent.append((self.clock(), payload))
        return self._transmit(self, payload, on_air_len) if self._transmit else True

    def wake(self):
        """One wake cycle at the current simulated time (and, after a reset, the reboots that
        follow at once); returns seconds until the next wake."""
        hw = self.hw
        hw.sleep_charge_mAs = 0.0
        charge0 = hw.charge_mAs
        if not self._booted:
            hw.power_on(self.clock())
            self._booted = True
        else:
            hw.wake_up(self.clock())
        start = hw.now - chip.BOOT_MS
        for _ in range(MAX_RESETS):
            self._run_firmware()
            if hw.halted == "deepsleep":
                break
            self.resets += 1
            hw.wake_up(hw.epoch())
        hw.awake_ms = hw.now - start  # from the wake (boot included) to deep sleep
        self.awake_charge_uAh = (hw.charge_mAs - charge0 - hw.sleep_charge_mAs) / 3.6
        self.battery.draw(hw.charge_mAs - charge0, 1.0)
        counted = max(1, int((hw.sleep_ms or 1000) / 1000))
        if self.rtc_drift is None:
            return counted
        slept = self.rtc_drift.slept_s(counted, self.weather.air_c(self.clock()))
        hw.rtc_error_s += counted - slept  # the RTC wakes the chip once it has counted `counted`: it runs ahead
        return slept

    def drift_rtc(self, seed, clock="rc"):
        """The RTC counts deep sleep on the chip's RC oscillator, or on a 32.768 kHz crystal
        (clock="xtal32k"), at this unit's rate (parts/esp32.py)."""
        self.rtc_drift = chip.RTC_CLOCKS[clock](random.Random(seed))

    def _run_firmware(self):
        if self.vm is not None:
            self.vm.run_cycle(self.hw, self.cfg_dict, self.raw_config)
            self.fuel.append(self.vm.last_fuel)
            return
        hw_module = self.hw.load_hw()
        try:
            app.start(hw_module, self.cfg, self.chash)
        except self.hw.halt_class():
            pass

    def frames(self):
        """Every protocol frame this device put on air, in order."""
        return [f for _, p in self.sent for f in self.frames_in(p)]

    def frames_in(self, data):
        """Protocol frames in what went on air: bare for RYLR998 and Wi-Fi, COBS + CRC framed
        otherwise (what the gateway's deframer makes of it: garbage is dropped)."""
        if self.cfg["transport"] in ("rylr998", "wifi"):
            return [bytes(data)]
        last = self._framed  # the bin's record of what it sent and the gateway's half take the same payload apart
        if last[0] is data:
            return list(last[1])
        frames = [b for kind, b, _ in framing.Deframer().feed(data) if kind == "frame"]
        if type(data) is bytes:  # immutable: the same object holds the same frames
            self._framed = (data, tuple(frames))
        return frames
