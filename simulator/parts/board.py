"""One simulated bin's electronics: the ESP32 model, the radio, the sensors, the supply — wired
as a board profile — behind MicroPython's own APIs (machine, esp32, time, onewire, ds18x20,
network, umqtt.simple: the stand-ins in upy/). The firmware's real hw.py runs on top:

- CPython: `board.load_hw()` executes hw.py with those stand-ins as its imports.
- MicroPython VM: `vm_folder()` holds the firmware and the stand-ins; the VM's `hw_call` host
  function is `board.dispatch` (the same stand-in sources, so both interpreters see one board).

A simulated clock (milliseconds) drives every timing; `dispatch` advances it by the time a call
takes. Faults and resets are injected from tests (`inject_reset`, part attributes)."""
import builtins
import math
import os
import random
import shutil
import tempfile
import types

from binlink.sim import parts as parts_package
from binlink.sim.parts import cell as cell_model
from binlink.sim.parts import esp32 as chip
from binlink.sim.parts.e22 import E22, E32
from binlink.sim.parts.rylr998 import Rylr998
from binlink.sim.parts.sensors import A02yyuw, Ds18b20, EchoSensor, HcSr04
from binlink.sim.parts.wifi import WifiOps

# from the package's directory, not this module's: a compiled build of it lies elsewhere (compiled.py)
PARTS = os.path.dirname(os.path.abspath(parts_package.__file__))
UPY = os.path.join(PARTS, "upy")
FIRMWARE = os.path.join(os.path.dirname(os.path.dirname(PARTS)), "firmware")
HW_PY = os.path.join(FIRMWARE, "binlink", "firmware", "hw.py")
UPY_MODULES = ("_host", "time", "machine", "esp32", "onewire", "ds18x20", "network", "umqtt", "umqtt.simple")

# Board profiles (docs/energy.md): what draws current besides the parts.
PROFILES = {
    # ESP32 DevKitC-style board as a devboard is powered: from USB or a 5 V supply through its AMS1117
    # LDO (5 mA quiescent; 1.1 V dropout, so a 3.6 V cell would leave the chip ~2.5 V, at the
    # brown-out threshold: it cannot run from the cell). Sensor on the rail all the time; the
    # 2 x 100 kOhm divider always across the cell it measures. The supply never browns out.
    "devboard": {"regulator_ma": 5.0, "rail_switched": False, "divider_switched": False, "supply": "usb"},
    # Custom board from the Li-SOCl2 cell: low-Iq LDO (MCP1700, 1.6 uA, 178 mV dropout at 250 mA),
    # sensor rail switched by a P-MOSFET (off unless its pin drives it on), divider switched by a
    # MOSFET on its low side. No reservoir capacitor across the cell: the radio's pulse is the cell's.
    "custom": {"regulator_ma": 0.0016, "rail_switched": True, "divider_switched": True, "supply": "cell"},
    # The same with a 32.768 kHz crystal for the RTC (esp32.Xtal32k): ESP-IDF "System Time" puts the
    # cost at ~1 uA more in deep sleep; it runs all the time.
    "custom_xtal32k": {"regulator_ma": 0.0016, "xtal32k_ma": 0.001, "rail_switched": True, "divider_switched": True,
                       "supply": "cell"},
}
DIVIDER_OHMS = 200_000


class Board(WifiOps):
    def __init__(self, cfg, battery, surface_mm, air_c, acoustics, transmit, rng, profile="custom", timing="random"):
        """cfg: the firmware's parsed config (pins, transport, sensor). battery: physics.Battery.
        surface_mm()/air_c(): the bin. transmit(payload, on_air_len, sf, bw, dbm) -> bool.
        timing: the parts' timings a manual gives as a range (or not at all) are drawn from it
        ("random", a stream of its own per device) or always at its slow end ("slow")."""
        self.cfg = cfg
        self.profile = PROFILES[profile]
        self.battery = battery
        self.esp = chip.Esp32()
        self.now = 0.0
        self.epoch0 = 0.0
        self.rtc_error_s = 0.0  # the chip's RTC minus true time (its clock, as time.time() reads it)
        self.charge_mAs = 0.0
        self.sleep_charge_mAs = 0.0  # of charge_mAs: spent in the deep sleep before this wake
        self.halted = None
        self.ops = 0
        self.reset_at = None  # (op number, kind): inject a reset at that hardware call
        self.error_at = None  # op number: that hardware call fails with an OSError
        self.brownouts = 0  # resets by the ESP32's brown-out detector (the cell sagging under a load)
        self.sleep_ms = None
        self.tilted = False
        self.hot_c = None
        self.air_c = air_c
        self.transmit = transmit
        self.wifi = {"ap": True, "broker": "ok", "connect_ms": 1500.0, "associated": False,
                     "subscribed": None, "inbox": []}  # the session's topic; (at ms, topic, payload) for it
        self.mqtt_sent = []
        self._ops = {}  # stand-in op -> its op_ method
        self.parts = []
        self._peers = {}  # UART id -> the part on its other end
        if timing == "slow":
            self.draw = lambda lo_hi: lo_hi[1]
        else:
            trng = random.Random(cfg["device_id"] or 0)  # not the world's stream: timings do not shift the bin
            self.draw = lambda lo_hi: trng.uniform(lo_hi[0], lo_hi[1])
        kind = cfg["transport"]
        self.radio = None
        ruart = cfg["radio_uart"]
        if kind in ("e22", "e32"):
            cls = E22 if kind == "e22" else E32
            self.radio = cls(cfg["radio_m0_pin"], cfg["radio_m1_pin"], cfg["radio_aux_pin"], self._key_up, self.draw)
        elif kind == "rylr998":
            self.radio = Rylr998(self._key_up)
        elif kind == "serial":
            self.radio = _Wire(transmit)
            self.radio.baud = ruart[1]
        if self.radio is not None:
            self._attach_uart(ruart[0], self.radio)
            self.parts.append(self.radio)
        sensor = cfg["sensor"]
        self.rail = []  # parts on the switched sensor rail
        if sensor == "a02yyuw":
            su = cfg["sensor_uart"]
            self.sensor = A02yyuw(acoustics, surface_mm, air_c, su[2], rng)
            self.sensor.listening = lambda: su[0] in self.esp.uarts
            self._attach_uart(su[0], self.sensor)
        else:
            cls = HcSr04 if sensor == "hc-sr04" else EchoSensor
            self.sensor = cls(acoustics, surface_mm, air_c, cfg["trig_pin"], cfg["echo_pin"])
        self.parts.append(self.sensor)
        self.rail.append(self.sensor)
        self.thermo = Ds18b20(lambda: self.hot_c if self.hot_c is not None else air_c())
        self.parts.append(self.thermo)
        # the parts are wired for good: what the clock calls at every step is looked up once
        self._watchers = self._pin_watchers()  # pad -> the on_pin() of the parts wired to it
        self._steps = [p.step for p in self.parts if not getattr(p, "IDLE_STEP", False)]  # a part's step() that acts
        self._next_events = [p.next_event for p in self.parts]
        # parts whose next_event() the board keeps until they say touched() (_next_stop); the others
        # are asked at every step of the clock, and stepped whenever the clock is
        cached = [p for p in self.parts if getattr(p, "EVENTS_CACHED", False)]
        for p in cached:
            p.touched = self._touched
        self._live_events = [p.next_event for p in self.parts if p not in cached]
        self._live_steps = [p.step for p in self.parts if p not in cached and not getattr(p, "IDLE_STEP", False)]
        # a radio whose incoming UART bytes the clock may pass over in one go (_quiet_run)
        quiet = self.radio in cached and hasattr(self.radio, "quiet_bytes") and not self._live_events
        self._quiet = self.radio.quiet_bytes if quiet else None
        self._radio_event = self.radio.next_event if quiet else None
        self._other_events = [p.next_event for p in cached if not (quiet and p is self.radio)]
        self._due_at = None  # the cached parts' first event as they last answered, or None: ask them
        self._others_at = math.inf  # of them, the first but the quiet radio's
        self._current_untils = [p.current_until for p in self.parts if hasattr(p, "current_until")]  # the others draw steadily
        self._part_ma = [p.current_ma for p in self.parts]
        self._regulator_ma = self.profile["regulator_ma"] + self.profile.get("xtal32k_ma", 0.0)  # drawn all the time
        self._divider_switched = self.profile["divider_switched"]
        self._battery_en_pin = cfg["battery_en_pin"]
        self._rail_pin = cfg["sensor_power_pin"] if self.profile["rail_switched"] else None  # switches the sensor rail
        has_aux = self.radio is not None and hasattr(self.radio, "aux_level")
        self._aux_pin = cfg.get("radio_aux_pin") if has_aux else None  # reads the module's AUX line
        self._ma, self._ma_until = 0.0, -math.inf  # the current now, and until when it holds (_recount)
        self._on_cell = self.profile["supply"] == "cell" and hasattr(battery, "holds_up")
        self.bod_mv = cell_model.BOD_MV
        self._rail_on(not self.profile["rail_switched"])

    def _attach_uart(self, uid, part):
        part.deliver = lambda data, start, baud, uid=uid: self._to_esp(uid, data, start, baud)
        self._peers[uid] = part

    # clock and energy ---------------------------------------------------------------------------
    def epoch(self):
        return self.epoch0 + self.now / 1000.0

    def current_ma(self):
        """What the board draws now: the chip, the regulator and divider, and every part."""
        e = self.esp
        ma = chip.DEEP_SLEEP_MA if e.asleep else chip.LIGHT_SLEEP_MA if e.light else chip.ACTIVE_MA + (chip.WIFI_MA if e.wifi_on else 0.0)
        static = self._regulator_ma
        if self._divider_on():
            static += self.battery.mv(ma) / DIVIDER_OHMS  # mV / ohm = mA
        ma += static
        now = self.now
        for part_ma in self._part_ma:
            ma += part_ma(now)
        return ma

    def _divider_on(self):
        return not self._divider_switched or self.esp.pad(self._battery_en_pin) == 1

    def _recount(self):
        """_ma = current_ma(), and _ma_until: a part's current changes by itself only at its
        current_until() (a packet leaves the air, an echo ends...), else with its state (a step that
        acted, a pin, a command: those recount or set -inf); the divider's with the cell, at any time."""
        e = self.esp
        now = self.now
        # current_ma(), its sums in its order
        ma = chip.DEEP_SLEEP_MA if e.asleep else chip.LIGHT_SLEEP_MA if e.light else chip.ACTIVE_MA + (chip.WIFI_MA if e.wifi_on else 0.0)
        static = self._regulator_ma
        divider = not self._divider_switched or e.pad(self._battery_en_pin) == 1
        if divider:
            static += self.battery.mv(ma) / DIVIDER_OHMS
        ma += static
        for part_ma in self._part_ma:
            ma += part_ma(now)
        self._ma = ma
        if divider:
            self._ma_until = -math.inf
            return
        until = math.inf
        for current_until in self._current_untils:
            t = current_until(now)
            if t is not None and t < until:
                until = t
        self._ma_until = until

    def advance(self, ms):
        """Lets ms of simulated time pass: parts act on their own timeline, charge is counted,
        the watchdog bites when due (chip.Stop)."""
        e = self.esp
        now = self.now
        if ms <= 0:  # every part brought up to now (before something observes it): the loop's one turn
            self._act(now, True)
            return
        end = now + ms
        while True:
            # _next_stop(now, end)
            due = self._due_at
            if due is None or due <= now:
                due = self._cached_first(now)
            if due <= now:
                nxt, first = self._scan(now, end)
            else:
                if due <= end and self._quiet is not None and due < self._others_at:
                    inbound = self.radio.inbound
                    if inbound and inbound[0][0] == due:
                        reached = self._quiet_run(now, end)
                        if reached > now:
                            now = reached
                            if now >= end:
                                return
                            continue
                nxt = due if due < end else end
                first = due
                for next_event in self._live_events:
                    t = next_event(now)
                    if t is not None:
                        if t < first:
                            first = t
                        if now < t < nxt:
                            nxt = t
            wdt = e.wdt_due
            if wdt is not None and not e.asleep and wdt < nxt:
                nxt = wdt
            if nxt > now:  # the current is constant between events
                self.charge_mAs += self._ma * (nxt - now) / 1000.0
                if self._on_cell:
                    self.battery.load(self._ma, nxt - now)
                self.now = now = nxt
            self._act(now, first <= now)  # no part has anything to do before its first event
            if now >= end:
                return

    def _act(self, now, stepping):
        """At `now`: the parts with something due step (stepping), the current is recounted when it
        may have changed, then the brown-out detector and the watchdog."""
        e = self.esp
        acted = False
        if stepping:
            due = self._due_at
            if due is None:
                due = self._cached_first(now)
            if due <= now:  # every part steps (a list: each of them)
                acted = any([step(now) for step in self._steps])
                self._due_at = None
            elif self._live_steps:  # the cached parts have nothing due: their step() would do nothing
                acted = any([step(now) for step in self._live_steps])
        if acted or now >= self._ma_until:
            self._recount()
        if self._on_cell and not e.asleep and not self.battery.holds_up(self._ma, self.bod_mv):  # _supply_check(), inline: at every step
            self.brownouts += 1
            raise chip.Stop("brownout")
        if e.wdt_due is not None and not e.asleep and now >= e.wdt_due:
            raise chip.Stop("watchdog")

    def _touched(self):
        self._due_at = None

    def _cached_first(self, now):
        """The cached parts' first event (inf: none), asked of them when not kept. A kept answer
        holds while it lies ahead: their state is the same, and what they drop as time passes (a
        transmission or an echo that ended) was later than it."""
        first = math.inf
        for next_event in self._other_events:
            t = next_event(now)
            if t is not None and t < first:
                first = t
        self._others_at = first
        if self._radio_event is not None:
            t = self._radio_event(now)
            if t is not None and t < first:
                first = t
        self._due_at = first
        return first

    def _quiet_run(self, now, end):
        """advance()'s loop over the radio's next bytes from the UART while they only fill its buffer
        (E22.quiet_bytes) and come before every other event: each is a step of the clock as there
        (the charge, the cell's load, the current recounted when due, the brown-out detector), only
        the radio takes them after the last of them, as nothing reads its buffer meanwhile. The
        first of them is the first event after now; returns the time reached (now: none of them)."""
        e = self.esp
        stop = self._others_at
        wdt = e.wdt_due
        if wdt is not None and not e.asleep and wdt < stop:
            stop = wdt
        times = self._quiet(now, end)
        if not times or times[0] >= stop:
            return now
        on_cell = self._on_cell
        load, holds_up = self.battery.load, self.battery.holds_up
        n = 0
        try:
            for t in times:
                if t >= stop:
                    break
                ma = self._ma
                self.charge_mAs += ma * (t - now) / 1000.0
                if on_cell:
                    load(ma, t - now)
                self.now = now = t
                n += 1
                if now >= self._ma_until:
                    self._recount()
                if on_cell and not e.asleep and not holds_up(self._ma, self.bod_mv):  # _supply_check()
                    self.brownouts += 1
                    raise chip.Stop("brownout")
        finally:
            self.radio.take_bytes(n)  # its step() up to now: the other parts' would do nothing
            self._due_at = None
        return now

    def _next_stop(self, now, end):
        """(the first part's event after now, or end; the first part's event, due or not)"""
        due = self._due_at
        if due is None or due <= now:
            due = self._cached_first(now)
            if due <= now:  # something due: what comes after it only the parts know
                return self._scan(now, end)
        nxt = due if due < end else end
        first = due
        for next_event in self._live_events:
            t = next_event(now)
            if t is not None:
                if t < first:
                    first = t
                if now < t < nxt:
                    nxt = t
        return nxt, first

    def _scan(self, now, end):
        nxt = end
        first = math.inf
        for next_event in self._next_events:  # every part, due or not
            t = next_event(now)
            if t is not None:
                if t < first:
                    first = t
                if now < t < nxt:
                    nxt = t
        return nxt, first

    def _supply_check(self):
        """The ESP32's brown-out detector: a load that pulls VDD (the cell's loaded voltage through
        the LDO) under its threshold resets the chip, reported as a power-on with RTC memory intact."""
        if self._on_cell and not self.esp.asleep and not self.battery.holds_up(self._ma, self.bod_mv):
            self.brownouts += 1
            raise chip.Stop("brownout")

    # the wake cycle, from the simulator's side --------------------------------------------------
    def power_on(self, epoch):
        self.esp.power_loss()
        self.thermo.power_on()
        self._start(epoch, chip.PWRON)

    def wake_up(self, epoch):
        """Deep sleep (or the reset that ended the last run) until `epoch`; then boot."""
        slept = max(0.0, (epoch - self.epoch()) * 1000.0)
        charge0 = self.charge_mAs
        if self._on_cell:
            self.battery.hold_temperature()
        if self.sleep_ms is not None:
            try:
                self.advance(slept)
            except chip.Stop:
                pass
            cause = chip.DEEPSLEEP
        else:
            cause = self._reset_cause
        self.sleep_charge_mAs = self.charge_mAs - charge0
        self._start(epoch, cause)

    def _start(self, epoch, cause):
        self.epoch0 = epoch - self.now / 1000.0
        if self._on_cell:
            self.battery.hold_temperature()
        self.esp.boot(cause)
        ext0 = self.esp.wake_ext0
        if cause != chip.DEEPSLEEP:
            self.esp.wake = 0
        elif ext0 and ext0[0] == self.cfg["tilt_pin"] and (0 if self.tilted else 1) == ext0[1]:
            self.esp.wake = chip.WAKE_EXT0  # the tilt switch woke it (the simulator wakes it at its next turn)
        else:
            self.esp.wake = chip.WAKE_TIMER
        self.esp.wake_ext0 = None
        self.halted = None
        self.sleep_ms = None
        self.ops = 0
        self._pins_changed()
        try:
            self.advance(chip.BOOT_MS)  # ROM bootloader, image load, MicroPython start, until main.py
        except chip.Stop as s:
            self._halt(s.kind)

    def _pins_changed(self):
        for pin, watchers in self._watchers.items():
            lvl = self.esp.pad(pin)
            for on_pin in watchers:
                on_pin(pin, lvl, self.now)
        if self.profile["rail_switched"]:
            self._rail_on(self.esp.pad(self.cfg["sensor_power_pin"]) == 1)
        self._recount()

    def _pin_watchers(self):
        """{pad: the on_pin() of each part wired to it}: the E22/E32's M0 and M1, the echo sensor's
        trigger or the A02YYUW's RX. A pad's edges go to its own parts only (on_pin returns True
        when what the part draws changed)."""
        c = self.cfg
        wired = [(c["radio_m0_pin"], self.radio), (c["radio_m1_pin"], self.radio)] if c["transport"] in ("e22", "e32") else []
        wired.append((c["sensor_uart"][2] if c["sensor"] == "a02yyuw" else c["trig_pin"], self.sensor))
        watchers = {}
        for pin, part in wired:
            if pin >= 0:
                watchers.setdefault(pin, []).append(part.on_pin)
        return watchers

    def _rail_on(self, on):
        for p in self.rail:
            if (p.powered_at is not None) != on:
                p.power(on, self.now)

    def _halt(self, kind):
        """Execution stops: deep sleep (pads not held float) or a reset (the chip restarts)."""
        self.halted = kind
        if kind == "deepsleep":
            self.esp.asleep = True
            self._pins_changed()
        else:
            self._reset_cause = {"watchdog": chip.WDT, "brownout": chip.PWRON, "soft": chip.SOFT,
                                 "hard": chip.HARD}.get(kind, chip.PWRON)
            if kind == "brownout" and self.brownouts and hasattr(self.radio, "power_on"):
                self.radio.power_on()  # the supply sagged under the module too: its buffers are gone
            if kind == "power_loss":
                self.esp.power_loss()
                self.thermo.power_on()
                if hasattr(self.radio, "power_on"):
                    self.radio.power_on()
            self.esp.asleep = False
            self.esp.pins = {k: v for k, v in self.esp.pins.items() if v["hold"]}
            self._pins_changed()

    def power_loss(self):
        """Battery swap or a cut supply between wakes: RTC memory and the modules' state gone."""
        self._halt("power_loss")
        self.sleep_ms = None

    @property
    def rtc(self):
        return self.esp.rtc

    @property
    def module_down(self):
        """The radio module not answering (no power, broken), or for Wi-Fi the broker gone."""
        if self.cfg["transport"] == "wifi":
            return self.wifi["broker"] == "down"
        return self.radio.dead

    @module_down.setter
    def module_down(self, down):
        if self.cfg["transport"] == "wifi":
            self.wifi["broker"] = "down" if down else "ok"
        else:
            self.radio.dead = down
            self._ma_until = -math.inf

    def _key_up(self, payload, on_air_len, sf, bw, dbm):
        """The radio keys up: its current pulse through the cell's internal resistance may pull the
        supply under the brown-out threshold before the packet is out (the module on the same rail
        drops out with the chip)."""
        if self._on_cell:
            self._recount()
            self._supply_check()
        return self.transmit(payload, on_air_len, sf, bw, dbm)

    def inject_reset(self, at_op, kind):
        self.reset_at = (at_op, kind)

    def inject_error(self, at_op):
        """The stand-in call number at_op fails as a faulty part would: the firmware sees an OSError."""
        self.error_at = at_op

    # the firmware's side: one entry for every stand-in call ---------------------------------------
    def dispatch(self, op, args):
        if self.halted:
            return {"halt": self.halted}
        self.ops += 1
        try:
            if self.reset_at and self.ops >= self.reset_at[0]:
                kind = self.reset_at[1]
                self.reset_at = None
                raise chip.Stop(kind)
            if self.error_at == self.ops and op != "deepsleep":  # the chip's own: no part to fail
                self.error_at = None
                return {"oserror": "injected fault at call %d (op_%s)" % (self.ops, op)}
            # the interpreter's time around the call: no part acts within it (they are stepped
            # before anything observes them), only the charge and the watchdog count
            call_ms = chip.CALL_MS
            self.charge_mAs += self._ma * call_ms / 1000.0
            self.now = now = self.now + call_ms
            due = self.esp.wdt_due
            if due is not None and now >= due:
                self.advance(0.0)
            try:
                call = self._ops[op]
            except KeyError:
                call = self._ops[op] = getattr(self, "op_" + op)
            return call(*args)
        except chip.Stop as s:
            self._halt(s.kind)
            return {"halt": s.kind}
        except Exception as e:  # noqa: BLE001 - a faulty part: the firmware sees an OSError
            return {"oserror": "%s: %s" % (op, e)}

    def op_ticks_us(self):
        return int(self.now * 1000)

    def op_sleep_us(self, us):
        self.advance(us / 1000.0)

    def op_time(self):
        return int(self.epoch() + self.rtc_error_s)

    def op_time_ns(self):
        return int((self.epoch() + self.rtc_error_s) * 1000.0) * 1000000

    # the air, from the simulator's side ---------------------------------------------------------
    def air_packet(self, payload, start_ms, sf, bw_khz, freq_mhz=None, **kw):
        """A packet on air reaching this bin's antenna from start_ms (board time) for its time on
        air at sf/bw_khz: the radio module receives it if it is listening then (its datasheet's
        rules, parts/e22.py, parts/rylr998.py); a serial cable delivers it as is. Returns the
        packet's end (ms) or None when this board has no radio."""
        if self.radio is None or not hasattr(self.radio, "air_rx"):
            return None
        return self.radio.air_rx(bytes(payload), start_ms, sf, bw_khz, freq_mhz, **kw)

    def op_reset_cause(self):
        return self.esp.cause

    def op_wake_reason(self):
        return self.esp.wake

    def op_deepsleep(self, ms):
        self.sleep_ms = ms
        raise chip.Stop("deepsleep")

    def op_reset(self):
        raise chip.Stop("hard")

    def op_wake_on_ext0(self, pin, level):
        self.esp.wake_ext0 = None if pin is None else (pin, level)

    def op_lightsleep(self, ms):
        """machine.lightsleep: the chip at its light-sleep current until ms pass or the ext0 pin
        reaches its level (the UARTs receive nothing meanwhile: their clock stops). ext0 is
        level-triggered: a pin already at its level wakes the chip at once; an AUX edge wakes it
        when it happens (the module's aux_next), not at the parts' next event after it."""
        e = self.esp
        begin = self.now
        end = begin + ms
        ext0 = e.wake_ext0
        edge = self.radio.aux_next if ext0 is not None and ext0[0] == self._aux_pin else None
        e.light = True
        self._recount()
        try:
            while self.now < end:
                self.advance(0.0)
                if ext0 is not None and self._level(ext0[0]) == ext0[1]:
                    break
                nxt = self._next_stop(self.now, end)[0]
                t = edge(self.now) if edge is not None else None
                if t is not None and t < nxt:
                    nxt = t
                self.advance(nxt - self.now)
        finally:
            e.light = False
            self._recount()
            for u in e.uarts.values():  # bytes that came meanwhile were never received
                u.rx = [r for r in u.rx if not begin < r[0] <= self.now]
        self.advance(chip.LIGHT_WAKE_MS)

    def _level(self, pin):
        if pin == self._aux_pin:
            return self.radio.aux_level(self.now)
        if pin == self.cfg["tilt_pin"]:
            return 0 if self.tilted else 1
        return None

    def op_pin_init(self, pin, mode, pull, value, hold):
        self.esp.pin_init(pin, mode, pull, value, hold)
        self._pin_changed(pin)

    def op_pin_set(self, pin, value):
        self.esp.pin_set(pin, value)
        self._pin_changed(pin)

    def _pin_changed(self, pin):
        watchers = self._watchers.get(pin)
        if watchers is not None:
            self.advance(0.0)  # parts up to now before they see the edge
            lvl = self.esp.pad(pin)
            for on_pin in watchers:
                if on_pin(pin, lvl, self.now):  # what it draws changed: counted at the next step
                    self._ma_until = -math.inf
        elif pin == self._rail_pin or pin == self._battery_en_pin:  # the sensor rail, the divider: what they draw changes
            if pin == self._rail_pin:
                self._rail_on(self.esp.pad(pin) == 1)
            self._recount()
        elif self.now >= self._ma_until:  # another pin: only the parts' own currents, as time passed
            self._recount()

    def op_pin_value(self, pin):
        self.advance(0.0)
        level = self._level(pin)
        if level is not None:
            return level
        p = self.esp.pins.get(pin)
        if p and p["out"]:
            return p["level"]
        return 1 if p and p["pull"] == "up" else 0

    def op_time_pulse_us(self, pin, level, timeout_us):
        """machine.time_pulse_us: -2 when the pin never reaches `level`, -1 when it stays there
        past the timeout (the measured time otherwise)."""
        high = self.sensor.pulse(self.now) if hasattr(self.sensor, "pulse") else None
        timeout = timeout_us / 1000.0
        if high is None or high[1] <= self.now or high[0] - self.now > timeout:
            self.advance(timeout)
            return -2
        start = max(self.now, high[0])
        if high[1] - start > timeout:
            self.advance(start - self.now + timeout)
            return -1
        self.advance(high[1] - self.now)
        return int((high[1] - start) * 1000)

    def op_adc_read_uv(self, pin, atten):
        if pin != self.cfg["battery_pin"]:
            return 0
        if not self._divider_on():
            return 0  # divider switched off: the ADC pin is pulled to ground
        return min(self.battery.mv(self._ma) * 500, 3_100_000)  # the loaded cell, 1:2 divider, 11 dB range ends ~3.1 V

    # UART ------------------------------------------------------------------------------------------
    def op_uart_init(self, uid, baud, tx, rx, timeout, rxbuf):
        u = self.esp.uarts.get(uid) or chip.Uart(uid)
        u.baud, u.rxbuf, u.timeout = baud, rxbuf, timeout
        self.esp.uarts[uid] = u

    def _to_esp(self, uid, data, start, baud):
        u = self.esp.uarts.get(uid)
        if u is None:
            return
        byte_ms = 10000.0 / baud
        for i, b in enumerate(data):
            if baud != u.baud:
                b = (b * 37 + 0x5A) & 0xFF  # framing at the wrong rate: garbage
            u.rx.append([start + (i + 1) * byte_ms, b])

    def _arrived(self, u):
        n = 0
        while n < len(u.rx) and u.rx[n][0] <= self.now:
            n += 1
        if n > u.rxbuf:
            u.dropped += n - u.rxbuf
            del u.rx[u.rxbuf:n]
            n = u.rxbuf
        return n

    def op_uart_write(self, uid, hexdata):
        data = bytes.fromhex(hexdata)
        u = self.esp.uarts[uid]
        start = max(self.now, u.tx_done_ms)
        u.tx_done_ms = start + len(data) * u.byte_ms()
        peer = self._peers.get(uid)
        if peer is not None:
            peer.uart_rx(data, start, u.byte_ms(), u.baud)
        self.advance(min(len(data), 128) * 0.01)  # copying into the driver's buffer

    def op_uart_read(self, uid, n):
        self.advance(0.0)
        u = self.esp.uarts[uid]
        avail = self._arrived(u)
        if avail == 0 and u.timeout:
            self.advance(u.timeout)
            avail = self._arrived(u)
        take = avail if n is None or n < 0 else min(n, avail)
        out = bytes(b for _, b in u.rx[:take])
        del u.rx[:take]
        return out.hex() if out else None

    def op_uart_any(self, uid):
        self.advance(0.0)
        return self._arrived(self.esp.uarts[uid])

    def op_uart_flush(self, uid):
        u = self.esp.uarts[uid]
        if u.tx_done_ms > self.now:
            self.advance(u.tx_done_ms - self.now)

    def op_uart_txdone(self, uid):
        return self.esp.uarts[uid].tx_done_ms <= self.now

    def op_uart_deinit(self, uid):
        self.esp.uarts.pop(uid, None)

    # persistent memory ---------------------------------------------------------------------------
    def op_rtc_memory(self):
        return self.esp.rtc.hex()

    def op_rtc_memory_write(self, hexdata):
        data = bytes.fromhex(hexdata)
        if len(data) > chip.RTC_BYTES:
            raise ValueError("RTC memory holds %d bytes" % chip.RTC_BYTES)
        self.esp.rtc = data

    def op_nvs_get(self, ns, key):  # an int (i32) or a blob as hex
        return self.esp.nvs.get((ns, key))

    def op_nvs_set(self, ns, key, value):
        self.esp.nvs_pending[(ns, key)] = value

    def op_nvs_commit(self, ns):
        self.advance(5.0)  # a flash page write
        self.esp.nvs.update(self.esp.nvs_pending)
        self.esp.nvs_pending = {}

    def op_wdt_init(self, timeout):
        e = self.esp
        e.wdt_timeout = max(1000, timeout)  # machine_wdt.c: the task WDT, 1 s at least
        e.wdt_due = self.now + e.wdt_timeout

    def op_wdt_feed(self):
        e = self.esp
        if e.wdt_timeout:
            e.wdt_due = self.now + e.wdt_timeout

    # 1-Wire: DS18B20 ------------------------------------------------------------------------------
    def _ds(self, pin, rom=None):
        """The DS18B20 on the pin, if it answers: present, and for a Match ROM (rom: hex) its own
        code (the datasheet: only the slave that matches all 64 bits responds, the others wait for
        a reset; the pulled-up bus then reads all ones)."""
        ds = self.thermo if pin == self.cfg["temp_pin"] and self.thermo.present() else None
        if ds is not None and rom is not None and rom.lower() != ds.rom.hex():
            return None
        return ds

    def op_ow_reset(self, pin):
        self.advance(1.0)  # 480 us reset + presence
        return self._ds(pin) is not None

    def op_ow_scan(self, pin):
        self.advance(15.0)
        ds = self._ds(pin)
        return [ds.rom.hex()] if ds else []

    def op_ds_convert(self, pin):
        self.advance(1.0)
        ds = self._ds(pin)
        if ds:
            ds.convert(self.now)
            self._recount()

    def op_ds_read_scratch(self, pin, rom):
        self.advance(6.0)  # select ROM + 9 bytes at ~15 kbit/s
        ds = self._ds(pin, rom)
        return ds.read_scratch(self.now).hex() if ds else "ff" * 9

    def op_ds_write_scratch(self, pin, rom, data):
        self.advance(3.0)
        ds = self._ds(pin, rom)
        if ds:
            ds.write_scratch(bytes.fromhex(data))

    # the firmware on CPython -------------------------------------------------------------------------
    def load_hw(self):
        """firmware/binlink/firmware/hw.py as after a reset, importing the MicroPython stand-ins
        bound to this board (stateless: loaded once per board). Its body runs once per board: it
        only defines and calls nothing on the board, so each later wake gets the same module with
        its globals put back, in place, to what the body left (fresh containers: no pad, UART or
        watchdog from the last run), rather than the body run again to make the same functions."""
        m = vars(self).get("_hw")
        if m is None:
            imp = self._imp = self._importer()
            m = self._hw = _exec_module("binlink.firmware.hw", HW_PY, imp, {}, _builtins(imp))
            self._hw_fresh = dict(m.__dict__)
            self._hw_containers = [k for k, v in self._hw_fresh.items() if type(v) in _MUTABLE and k != "__builtins__"]
        g = m.__dict__
        fresh = self._hw_fresh
        g.clear()
        g.update(fresh)
        for k in self._hw_containers:
            g[k] = fresh[k].copy()
        return m

    def _importer(self):
        """The __import__ of the firmware on this board: the stand-ins (loaded once) for MicroPython's."""
        mods = vars(self).setdefault("upy", {})

        def load(name):
            if name not in mods:
                path = os.path.join(UPY, *name.split(".")) + ".py"
                if not os.path.exists(path):
                    path = os.path.join(UPY, *name.split("."), "__init__.py")
                mods[name] = _exec_module(name, path, imp, {"hw_call": self.dispatch} if name == "_host" else {})
                if name == "_host" and type(self).dispatch is Board.dispatch and "dispatch" not in vars(self):
                    # on CPython the board's own dispatch (not one a test wraps), the arguments as the
                    # tuple they come in (the VM's JSON wants a list)
                    mods[name].call = _direct_call(self.dispatch, mods[name].answer)
            return mods[name]

        def imp(name, globals=None, locals=None, fromlist=(), level=0):
            if name in UPY_MODULES:
                m = load(name)
                if "." in name and not fromlist:
                    return load(name.split(".")[0])
                return m
            return builtins.__import__(name, globals, locals, fromlist, level)

        return imp

    def halt_class(self):
        return self.upy["_host"].Halt


class _Wire:
    """A plain serial cable to the gateway: bytes go straight through, both ways."""

    IDLE_STEP = True
    EVENTS_CACHED = True  # no events at all

    def __init__(self, transmit):
        self.transmit = transmit
        self.deliver = None
        self.baud = 9600

    def air_rx(self, payload, start_ms, sf=0, bw_khz=0, freq_mhz=None, **kw):
        """What the gateway writes to the cable: here at start_ms at the line's rate."""
        if self.deliver:
            self.deliver(payload, start_ms, self.baud)
        return start_ms + len(payload) * 10000.0 / self.baud

    def uart_rx(self, data, start, byte_ms, baud):
        self.transmit(bytes(data), len(data), 0, 0, 0)

    def next_event(self, now):
        return None

    def current_ma(self, now):
        return 0.0


def _direct_call(dispatch, answer):
    """_host.call on CPython: answer() only for what it has to raise (its other answers are the value)."""

    def call(op, *args):
        r = dispatch(op, args)
        return answer(r) if type(r) is dict else r

    return call


def _builtins(imp):
    b = dict(builtins.__dict__)
    b["__import__"] = imp
    return b


def _exec_module(name, path, imp, extra, builtins_=None):
    """builtins_: _builtins(imp) made once (a module's code never changes them), else made here."""
    m = types.ModuleType(name)
    m.__file__ = path
    m.__dict__["__builtins__"] = builtins_ if builtins_ is not None else _builtins(imp)
    m.__dict__.update(extra)
    code = _CODE.get(path)
    if code is None:
        with open(path) as f:
            code = _CODE[path] = compile(f.read(), path, "exec")
    exec(code, m.__dict__)
    return m


_CODE = {}  # path -> compiled module body
_MUTABLE = (dict, list, set, bytearray)  # a module's containers, new at each load_hw


_VM_FOLDER = None


def vm_folder():
    """A generated folder for the VM's /input: the firmware package and the MicroPython API
    stand-ins (never the source tree: the VM can write into its mount)."""
    global _VM_FOLDER
    if _VM_FOLDER is None or not os.path.isdir(_VM_FOLDER):
        d = tempfile.mkdtemp(prefix="binlink-vm-")
        shutil.copytree(os.path.join(FIRMWARE, "binlink"), os.path.join(d, "binlink"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(UPY, d, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        _VM_FOLDER = d
    return _VM_FOLDER
