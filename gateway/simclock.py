"""A simulated site's clock, driven by the simulator, for the gateway and the planner in a demo.

The simulator (`binlink sim --clock-file`, `binlink demo`) runs 60-900 times faster than the wall
clock. A gateway stamping wall time would see minutes go by where the bins lived days, and the
forecast could never learn a daily rhythm. So in a simulation the whole site lives on simulated
time: the fleet writes its clock to a small file, and a gateway started with
BINLINK_SIM_CLOCK=<that file> (and a planner with --sim-clock) takes its time from it. Then
`received_at`, `measured_at`, `full_at` and the planner's rounds are all simulated time, one
consistent timeline, and the forecast sees the days the bins lived. Every message says
`time_synced: false` (its times are not a synchronised wall clock's), so a gateway meeting these
states on a broker later takes no clock evidence from them.

Only what is started that way changes: a gateway without the variable keeps the wall clock and
its checks (gateway/clock.py) as they are. The gateway says at start, at WARNING, that its time is
simulated. The file: four little-endian doubles, (simulated time, wall time it was written, speed,
their sum); a reader that finds the sum wrong (a write in progress) reads again."""
import logging
import math
import os
import struct
import time

ENV = "BINLINK_SIM_CLOCK"
_REC = struct.Struct("<4d")
MAX_AHEAD_S = 1.0  # wall seconds a reader extrapolates past the last write (the sim waits between wakes)


class ClockWriter:
    """The simulator's side: set(t) after each step of simulated time."""

    def __init__(self, path, speed):
        self.path = path
        self.speed = float(speed)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def set(self, sim_t, running=True):
        speed = self.speed if running else 0.0
        wall = time.time()
        os.pwrite(self.fd, _REC.pack(sim_t, wall, speed, sim_t + wall + speed), 0)

    def close(self, sim_t=None):
        if self.fd is not None:
            if sim_t is not None:
                self.set(sim_t, running=False)  # the simulation stopped: its clock stands still
            os.close(self.fd)
            self.fd = None


class SimClock:
    """The reader: a callable returning the simulated time, never going back. Between the
    simulator's writes it runs on at the simulation's speed, for at most MAX_AHEAD_S wall
    seconds (a stalled or finished simulation stops the clock rather than invent time).
    `simulated`: the pipeline marks what it stamps with this clock `time_synced: false`."""

    simulated = True

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)  # FileNotFoundError: start the simulator first
        self._last = self._read()[0]

    def _read(self):
        for _ in range(100):
            blob = os.pread(self.fd, _REC.size, 0)
            if len(blob) == _REC.size:
                sim, wall, speed, total = _REC.unpack(blob)
                if sim + wall + speed == total and math.isfinite(total) and sim > 0:  # inf/NaN: not a clock
                    return sim, wall, speed
        raise OSError("simulated clock %s: no complete record" % self.path)

    def __call__(self):
        try:
            sim, wall, speed = self._read()
        except OSError:
            return self._last
        ahead = time.time() - wall
        now = sim + (ahead if ahead < MAX_AHEAD_S else MAX_AHEAD_S) * speed if ahead > 0 else sim
        if now > self._last:
            self._last = now
        return self._last

    def close(self):
        os.close(self.fd)


def from_env(log=None):
    """The clock the gateway's pipeline uses: the simulated one when BINLINK_SIM_CLOCK names a
    file, else time.time."""
    path = os.environ.get(ENV)
    if not path:
        return time.time
    try:
        clock = SimClock(path)
    except OSError as e:
        from binlink.gateway.config import ConfigError

        raise ConfigError(["%s=%s: cannot read the simulated clock: %s (start the simulator first)" % (ENV, path, e)]) from None
    (log or logging.getLogger("binlink.simclock")).warning(
        "SIMULATED TIME from %s: received_at, measured_at and full_at are the simulation's clock, not the wall clock", path)
    return clock
