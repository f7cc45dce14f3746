"""A fleet of simulated bins running the real firmware, on a simulated clock that can run faster
than real time, over a simulated radio channel into real pseudo-terminals.

It records the ground truth — true fill at every measurement, collections, alarms, frames sent
and lost on air — so tests and benchmarks can compare it with what reached MQTT."""
import heapq
import math
import os
import random
import threading
import time

from binlink.gateway import registry
from binlink.sim.device import SimDevice
from binlink.sim.physics import DAY, Weather
from binlink.sim.radio import Channel, Receiver
from binlink.sim.serial_link import PtyLink


class Truth:
    def __init__(self):
        self.collections = []  # (bin_id, t, fill level before 0..1.2)
        self.alarms = []  # (bin_id, kind, t_start, t_end)
        self.readings = {}  # (device hex, fcnt) -> (true fill %, surface mm, t measured)

    def alarm_active(self, bin_id, kind, t, margin=1800):
        return any(b == bin_id and k == kind and s - margin <= t <= e + margin for b, k, s, e in self.alarms)


class Fleet:
    def __init__(self, bins, seed=1, fmt="raw", links=(), registry_path=None, vm=None, speed=0.0, t0=None,
                 radius_m=1500.0, channel=None, alarm_rate_per_week=0.05, wake_s=900, report_s=3600, sf=9,
                 sites=None, clock_file=None):
        """sites: one (x, y, extra loss dB) per link, where that gateway's radio stands (default: a
        row 300 m apart); with `channel` shadowing, a bin is heard by one, several or no gateway.
        clock_file: where the simulated clock is written for a gateway and a planner on simulated
        time (gateway/simclock.py)."""
        self.rng = random.Random(seed)
        self.fmt = fmt
        self.speed = speed
        self.t0 = time.time() if t0 is None else t0
        self.now = self.t0
        # the gateway's answers go on air from its module; this fleet does not deliver them: taken off the line
        self.links = [PtyLink(p, drain=True) if isinstance(p, str) else p for p in links]
        sites = sites or [(i * 300.0, 0.0, 0.0) for i in range(len(self.links))]
        receivers = [Receiver("radio%d" % i, link, fmt, *site) for i, (link, site) in enumerate(zip(self.links, sites))]
        chan = dict(channel or {})
        self.channel = Channel(random.Random(seed + 1), receivers, **chan)
        self.truth = Truth()
        self.alarm_rate = alarm_rate_per_week / (7 * DAY)
        weather = Weather()
        transport = "rylr998" if fmt == "rylr998" else "e22"
        self.devices = []
        for i in range(bins):
            dev_id = 0x100 + i
            key = bytes(self.rng.getrandbits(8) for _ in range(16))
            d = SimDevice(random.Random(seed * 7919 + i), dev_id, key, self._clock, transmit=self._transmit, vm=vm,
                          depth_mm=self.rng.choice((1000, 1200, 1500)), full_mm=250, transport=transport,
                          weather=weather, wake_s=wake_s, report_s=report_s, sf=sf)
            d.bin_id = "bin-%03d" % (i + 1)
            angle, r = self.rng.uniform(0, 2 * math.pi), radius_m * math.sqrt(self.rng.random())
            d.xy = (r * math.cos(angle), r * math.sin(angle))
            d.alarm_until = 0.0
            self.devices.append(d)
        if registry_path:
            self.write_registry(registry_path)
        self._stop = threading.Event()
        self.clock_out = None
        if clock_file:
            from binlink.gateway.simclock import ClockWriter

            self.clock_out = ClockWriter(clock_file, speed)
            self.clock_out.set(self.now, running=False)

    def latlon(self, d, centre=(52.52, 13.405)):
        """A bin's simulated position as WGS84 degrees around a city centre."""
        lat = centre[0] + d.xy[1] / 111320.0
        return round(lat, 6), round(centre[1] + d.xy[0] / (111320.0 * math.cos(math.radians(lat))), 6)

    def _clock(self):
        return self.now

    def write_registry(self, path):
        if os.path.exists(path):
            os.unlink(path)
        data = {"device": [{"device_id": "%06x" % d.device_id, "bin_id": d.bin_id, "key": d.key.hex(),
                            "depth_mm": d.bin.nominal_depth_mm, "full_mm": d.bin.full_mm,
                            "name": "Simulated bin %s" % d.bin_id[4:], "report_s": d.cfg["report_s"],
                            **dict(zip(("lat", "lon"), self.latlon(d)))}
                           for d in self.devices]}
        registry.write(path, data)

    def coverage(self):
        """bin_id -> names of the receivers that hear it on a typical day."""
        return {d.bin_id: self.channel.heard_by(d.device_id, d.xy, d.cfg["sf"]) for d in self.devices}

    @property
    def frames_sent(self):
        return sum(d.frames_sent for d in self.devices)

    def _transmit(self, dev, payload, on_air_len):
        return self.channel.transmit(dev.device_id, self.now, dev.xy, payload, on_air_len, dev.cfg["sf"], dev.tx_eirp_dbm)

    def stop(self):
        self._stop.set()

    def run(self, duration_s, on_progress=None):
        """Runs the fleet for duration_s of simulated time (paced by speed; 0 = flat out)."""
        start_wall = time.monotonic()
        end = self.now + duration_s
        queue = [(self.now + self.rng.uniform(0, d.cfg["wake_s"]), i) for i, d in enumerate(self.devices)]
        heapq.heapify(queue)
        while queue and not self._stop.is_set():
            t, i = heapq.heappop(queue)
            if t > end:
                break
            if self.speed > 0:
                due = start_wall + (t - self.t0) / self.speed
                delay = due - time.monotonic()
                if delay > 0:
                    self.channel.flush(self.now)
                    if self._stop.wait(delay):
                        break
            self.now = t
            if self.clock_out is not None:
                self.clock_out.set(t)
            d = self.devices[i]
            self._world(d, t)
            sleep = d.wake()
            self._record(d)
            heapq.heappush(queue, (t + sleep, i))
            self.channel.flush(t)
            if on_progress:
                on_progress(self)
        self.now = min(end, self.now) if queue else self.now
        self.channel.flush(self.now, force=True)
        if self.clock_out is not None:
            self.clock_out.set(self.now, running=False)

    def _world(self, d, t):
        """Physics up to t: filling, collections (scheduled and on demand), random alarms."""
        for when, level in d.bin.advance(t):
            self.truth.collections.append((d.bin_id, when, level))
        if d.bin.level >= 1.0 and d.bin.next_collection > t + 6 * 3600:
            d.bin.next_collection = t + self.rng.uniform(1, 6) * 3600  # full: the back office sends a truck
        if d.alarm_until and t >= d.alarm_until:
            d.hw.hot_c, d.hw.tilted, d.alarm_until = None, False, 0.0
        elif not d.alarm_until and self.rng.random() < self.alarm_rate * d.cfg["wake_s"]:
            kind = self.rng.choice(("fire", "tilt"))
            d.alarm_until = t + self.rng.uniform(1, 4) * 3600
            if kind == "fire":
                d.hw.hot_c = self.rng.uniform(75, 120)
            else:
                d.hw.tilted = True
            self.truth.alarms.append((d.bin_id, kind, t, d.alarm_until))

    def _record(self, d):
        for fcnt, (fill, surface) in d.truth.items():
            self.truth.readings.setdefault(("%06x" % d.device_id, fcnt), (fill, surface, self.now))
        d.truth.clear()

    @property
    def lost_on_air(self):
        return self.channel.lost

    def close(self):
        if self.clock_out is not None:
            self.clock_out.close(self.now)
        for link in self.links:
            link.close()
