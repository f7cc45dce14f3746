"""A fleet whose gateway answers (issue 20): a discrete-event co-simulation of the bins' wakes and
the gateway's radio on one channel.

Fleet runs each wake whole, in wake-start order, and resolves collisions afterwards. An answer
cannot be decided that way: it depends on every uplink that overlapped the one answered (also
those of wakes that start a little later), and while the gateway transmits it hears nothing.
Here every wake is a greenlet and a scheduler always resumes the one with the earliest simulated
time. A wake runs the real firmware on the part models until its module keys up; the packet goes
on the channel and the wake waits until the packet's end plus the gateway's turnaround. By then
every packet that overlapped it is on the channel too, so the channel resolves it at each
gateway radio (range, fading, capture, half-duplex), the gateway stores what verifies and, when
the packet asks for it, answers with the gateway's own code (gateway/downlink.py: ack bitmap,
desired settings in chunks, the duty-cycle bucket; binlink.wire.downlink encodes). The answer
takes the gateway's radio off the air for its time on air; at its end the channel decides whether
it reached the bin (the link, uplinks overlapping it at the bin) and it is put on air at the bin's
antenna: the bin's radio model decides whether it hears it."""
import heapq
import types

from binlink.firmware import state
from binlink.gateway import downlink as gw_downlink
from binlink.gateway import module_formats, registry_settings
from binlink.gateway.config import Source
from binlink.gateway.heads import WINDOW, shifted
from binlink.sim.fleet import Fleet
from binlink.sim.parts import lora
from binlink.sim.radio import Receiver
from binlink.wire import codec, downlink
from greenlet import getcurrent, greenlet

# From an uplink's end to its answer on air: the module hands the uplink to the Pi over its UART
# (22 ms), the gateway decides (a few ms), writes the framed downlink to the module (58 ms at
# 9600 baud) and the module keys up. The bins wait 200 ms (firmware listen.TURNAROUND_MS).
TURNAROUND_S = 0.12
KEPT_S = 10.0  # uplinks ended longer ago than this overlap nothing still to be resolved


class Gateway:
    """The gateway's side of the air: what verifies is stored once (counter window), listening
    uplinks are answered on the radio that heard them, within that radio's duty-cycle budget, with
    the gateway's own choices (gateway/downlink.py): the ack, settings in turns, the pace (half of
    it for a lossy bin), the echoes asked for, one answer's airtime kept for bins answered fewer
    than twice."""

    def __init__(self, channel, keys, clock, answer=True, fmt="raw", duty_cycle=Source.duty_cycle, echo="adaptive"):
        self.channel = channel
        self.keys = keys  # device_id -> key
        self.answer = answer
        self.echo = echo  # the echoes it asks the bins' reading frames to carry: as the gateway does ("adaptive"), or 0..2
        self.fmt = fmt
        self.radios = {rx.name: gw_downlink.Radio(types.SimpleNamespace(source=Source(rx.name, "", format=fmt,
                                                                                      duty_cycle=duty_cycle)), clock)
                       for rx in channel.receivers}
        self.last = {}  # device_id -> last accepted counter
        self.stored = {}  # device_id -> stored-readings window below it (heads.Counter.stored)
        self.frames = {}  # device_id -> counters of its batches and hellos stored (the last 32)
        self.reported = {}  # device_id -> settings hash of its last hello
        self.fw = {}  # device_id -> firmware version of its last hello
        self.desired = {}  # device_id -> the registry's settings table for it
        self._turn = {}  # device_id -> next config chunk
        self._asking = {}  # device_id -> the last frame that asked for an answer
        self._answered = {}  # device_id -> answers sent to it
        self._known = registry_settings.KnownSets()
        self.readings = {}  # (device_id, fcnt) of every reading stored -> when (its uplink's end)
        self.accepted = []  # (start, end, radio) of every uplink stored
        self.sent = []  # (start, end, radio) of every downlink put on air
        self.skipped = {"duty_cycle": 0, "radio_busy": 0}

    def set_desired(self, table):
        """`binlink registry set --all`: every bin's desired settings; refused as the bin would."""
        problems = registry_settings.problems({"settings": table}, "desired")
        if problems:
            raise ValueError(problems[0])
        self.desired = {dev: registry_settings.parse(table) for dev in self.keys}

    def desired_hash(self, dev):
        return registry_settings.desired_hash(self._device(dev))

    def _device(self, dev):
        return types.SimpleNamespace(device_id=dev, settings=self.desired.get(dev, ()))

    def store(self, dev, frames, tx, rx):
        """Stores the frames that verify; returns the counter of one that asks for an answer, or None."""
        key = self.keys[dev]
        ask = None
        for f in frames:
            try:
                fcnt = codec.verify(f, key, self.last.get(dev))
            except codec.ProtocolError:
                continue  # corrupted, or a copy already stored
            last = self.last.get(dev)
            self.stored[dev] = shifted(self.stored.get(dev, 0), WINDOW if last is None else fcnt - last)
            self.last[dev] = fcnt
            self.accepted.append((tx["t"], tx["end"], rx.name))
            ftype = f[0] & 0x0F
            if ftype != codec.T_READING:
                self.frames[dev] = [c for c in self.frames.get(dev, ()) if fcnt - c < 32] + [fcnt]
                self.radios[rx.name].heard[dev] = tx["end"]
            if ftype == codec.T_HELLO:
                self.fw[dev], _, self.reported[dev] = codec.hello_fields(f)
                continue
            for r in codec.readings(f, fcnt):
                behind = fcnt - r[0]
                if behind < WINDOW and not self.stored[dev] >> behind & 1:
                    self.stored[dev] |= 1 << behind
                    self.readings[(dev, r[0])] = tx["end"]
                if r[5] & downlink.F_LISTENING:
                    ask = fcnt
                    self._asking[dev] = f
                    self.radios[rx.name].heard[dev] = tx["end"]
        return ask

    def answer_to(self, dev, fcnt, rx, at):
        """The answer to uplink fcnt on radio rx at time `at`, booked on the channel: (payload on
        air, its time on air s), or None when the radio cannot send it (busy sending, budget spent)."""
        if not self.answer:
            return None
        if any(s <= at < e for s, e in self.channel.sending.get(rx.name, ())):
            self.skipped["radio_busy"] += 1
            return None
        ack = gw_downlink.ack_bitmap(self.last[dev], self.stored[dev], fcnt, self.frames.get(dev, ()))
        config = self._config(dev)
        radio = self.radios[rx.name]
        pace, echo = gw_downlink.radio_commands(radio, self.fw.get(dev), ack, fcnt, self._asking[dev], config,
                                                None if self.echo == "adaptive" else int(self.echo))
        frame = downlink.encode(self.keys[dev], dev, fcnt, ack=ack, time_ms=int(at * 1000), config=config, pace_min=pace,
                                echo=echo)
        data, on_air, preamble = module_formats.transmission(self.fmt, frame)
        if not radio.take(radio.time_on_air_ms(on_air, preamble), self._answered.get(dev, 0) < 2):
            self.skipped["duty_cycle"] += 1
            return None
        self._answered[dev] = self._answered.get(dev, 0) + 1
        if config is not None:
            self._turn[dev] = self._turn.get(dev, 0) + 1
        payload = data if self.fmt.startswith("raw") else frame.hex().upper().encode()
        toa = lora.time_on_air_s(on_air, radio.cfg.sf, radio.cfg.bandwidth_khz * 1000, preamble=preamble)
        self.channel.gateway_sends(rx, at, at + toa)
        self.sent.append((at, at + toa, rx.name))
        return payload, toa

    def _config(self, dev):
        """As the gateway's Answerer: the desired settings while the bin's reported hash differs."""
        return gw_downlink.config_command(self._device(dev), self.reported.get(dev), self._turn.get(dev, 0), self._known)


class DownlinkFleet(Fleet):
    """Fleet on the co-simulated channel; answer=False: the gateway never transmits (bins still
    listen when their firmware says so). rtc: what the bins' RTCs count deep sleep on, "rc" (the
    ESP32's internal oscillator) or "xtal32k" (a 32.768 kHz crystal), parts/esp32.py; None: true time."""

    def __init__(self, bins, answer=True, rtc="rc", sites=((0.0, 0.0, 0.0),), powered_within_s=None,
                 duty_cycle=Source.duty_cycle, echo="adaptive", **kw):
        """powered_within_s: the bins' first wakes spread over this long (default: one wake
        interval); a fleet installed over days does not boot, and ask for the time, at once."""
        super().__init__(bins, **kw)
        self.channel.receivers = [Receiver("radio%d" % i, None, self.fmt, *site) for i, site in enumerate(sites)]
        self.gateway = Gateway(self.channel, {d.device_id: d.key for d in self.devices}, lambda: self.now, answer,
                               self.fmt, duty_cycle, echo)
        if rtc:
            for d in self.devices:
                d.drift_rtc(d.device_id, rtc)
        self.air = []  # uplinks on air recently (a later one's rivals)
        self.bin_tx = {}  # device_id -> [(start, end)]
        self.clock_errors = []  # (true time, |bin's clock - true time| s) at each reading sent
        self.in_range = {d.device_id: True for d in self.devices}
        self.powered_within_s = powered_within_s
        self._heap = []
        self._seq = 0

    def at(self, t, fn):
        """Runs fn() at simulated time t, in order with the wakes."""
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn))

    def run(self, duration_s):
        end = self.now + duration_s
        for i, d in enumerate(self.devices):
            self._start_wake(i, self.now + self.rng.uniform(0, self.powered_within_s or d.cfg["wake_s"]), end)
        while self._heap:
            t, _, fn = heapq.heappop(self._heap)
            self.now = t
            fn()
        self.now = end

    def _start_wake(self, i, t, end):
        if t <= end:
            self.at(t, lambda: greenlet(self._wake).switch(i, t, end))

    def _wake(self, i, t, end):
        """One wake of bin i at t, in its own greenlet; it books the next one."""
        d = self.devices[i]
        self._world(d, t)
        sleep = d.wake()
        self.now = t
        self._record(d)
        self._start_wake(i, t + sleep, end)

    def _wait_until(self, t):
        """The current wake waits until every other has reached t."""
        task = getcurrent()
        self.at(t, task.switch)
        task.parent.switch()

    def _transmit(self, dev, payload, on_air_len):
        hw = dev.hw
        if any(f[0] & 0x0F == codec.T_READING for f in dev.frames_in(payload)):
            self.clock_errors.append((hw.epoch(), abs(self._clock_error(dev))))
        sf = dev.cfg["sf"]
        tx = self.channel.put_on_air(dev.device_id, hw.epoch(), dev.xy, payload, on_air_len, sf, dev.tx_eirp_dbm)
        self.bin_tx.setdefault(dev.device_id, []).append((tx["t"], tx["end"]))
        self.air.append(tx)
        self._wait_until(tx["end"] + TURNAROUND_S)
        answer = self._resolve(dev, tx)
        if answer is not None:
            rx, payload_dl, toa = answer
            start = tx["end"] + TURNAROUND_S
            self._wait_until(start + toa)  # every uplink that overlaps the answer at the bin is on air now
            if self.in_range[dev.device_id] and self.channel.reaches(rx, dev.device_id, dev.xy, start, start + toa,
                                                                     sf, self.air):
                hw.air_packet(payload_dl, (start - hw.epoch0) * 1000.0, sf, dev.cfg["bandwidth_khz"])
        return True

    def _resolve(self, dev, tx):
        """The uplink at every gateway radio; the answer (radio, payload, time on air) if one is sent."""
        now = tx["end"] + TURNAROUND_S
        self.air = [o for o in self.air if o["end"] > now - KEPT_S]
        self.channel.forget(now - KEPT_S)
        heard = intact = False
        reasons = set()
        answer = None
        for rx in self.channel.receivers:
            outcome, _, payload = self.channel.reception(tx, rx, self.air)
            if not self.in_range[dev.device_id]:
                outcome, payload = "lost_range", None
            reasons.add(outcome)
            if payload is None:
                continue
            heard = True
            intact = intact or outcome == "intact"
            ask = self.gateway.store(dev.device_id, dev.frames_in(payload), tx, rx)
            if ask is not None and answer is None:  # one radio answers: the one that stored it
                sent = self.gateway.answer_to(dev.device_id, ask, rx, now)
                answer = (rx,) + sent if sent else None
        self.channel.count(heard, intact, reasons)
        return answer

    def _clock_error(self, dev):
        """The bin's clock (its RTC, with the offset and rate downlinks set) minus true time, seconds."""
        s = state.unpack(dev.hw.rtc)
        rtc_ms = int((dev.hw.epoch() + dev.hw.rtc_error_s) * 1000.0)
        return (state.wall_ms(s, rtc_ms) - rtc_ms) / 1000.0 + dev.hw.rtc_error_s if s.clock_at else dev.hw.rtc_error_s
