"""The physical world of a bin: how it fills, what an ultrasonic ping sees, the air, the battery.

All randomness comes from a random.Random the caller seeds, so a run is reproducible."""
import math

DAY = 86400.0
R_GAS = 8.314462  # J/(mol K)
M_DRY, M_WATER = 0.0289647, 0.01801528  # kg/mol
CV_DRY, CV_WATER = 2.5, 3.03  # molar heat capacity at constant volume, in units of R (diatomic air; water vapour, gamma 1.33)


def saturation_pa(air_c):
    """Water vapour saturation pressure over water (Buck 1981)."""
    return 611.21 * math.exp((18.678 - air_c / 234.5) * (air_c / (257.14 + air_c)))


def speed_of_sound(air_c, rh=0.8, pressure_pa=101325.0):
    """Speed of sound in moist air from the ideal gas, sqrt(gamma R T / M), in mm/ms (= m/s).

    Water vapour is lighter than air and adds degrees of freedom: the mixture's molar mass and
    gamma follow the vapour's mole fraction. This is the simulator's physics, deliberately not the
    firmware's linear 331.3 + 0.606 T (which it approximates to ~0.1 % in dry air)."""
    x = max(0.0, min(1.0, rh)) * saturation_pa(air_c) / pressure_pa
    molar_mass = (1 - x) * M_DRY + x * M_WATER
    gamma = 1.0 + 1.0 / ((1 - x) * CV_DRY + x * CV_WATER)
    return math.sqrt(gamma * R_GAS * (air_c + 273.15) / molar_mass)


class Weather:
    """Air temperature: a daily cycle around a seasonal mean (winter by default: where a fixed
    343 m/s speed of sound is most wrong)."""

    def __init__(self, mean_c=4.0, swing_c=5.0):
        self.mean_c = mean_c
        self.swing_c = swing_c

    def air_c(self, t):
        return self.mean_c + self.swing_c * math.sin(2 * math.pi * ((t % DAY) / DAY - 0.375))  # peak ~15:00


def _shape(t):
    """The filling speed's daily x weekly shape at t, the same for every bin."""
    hour = (t % DAY) / 3600.0
    if 7 <= hour <= 21:
        wave = math.sin(math.pi * (hour - 7) / 14)
        daily = 0.25 + 1.5 * (wave if wave > 0.0 else 0.0)
    else:
        daily = 0.25
    weekday = int(t // DAY + 3) % 7  # 0 = Monday (1970-01-01 was a Thursday)
    weekly = 1.3 if weekday >= 5 else 1.0
    return daily * weekly


# every bin asks at the start of each STEP_S cell of absolute time (a month: 4,320 of them)
_SHAPES = {}
_SHAPES_MAX = 100_000


class Bin:
    """Fill level 0..1 of the usable height (1 = at full_mm), can overfill towards the lid.

    The bin as installed, not as registered: `nominal_depth_mm` is what the registry says (the
    catalogue depth), the true depth is off by a few cm; the sensor sits off its nominal place
    (higher or lower on its bracket, tilted a few degrees); the waste is a pile, and the beam's
    first echo comes from its peak, above the mean level that says how full the bin really is."""

    def __init__(self, rng, depth_mm=1200, full_mm=250, days_to_fill=None, collect_every_days=None, t0=0.0, honest=True):
        self.rng = rng
        self.nominal_depth_mm = depth_mm
        self.full_mm = full_mm
        if honest:
            self.depth_mm = depth_mm + max(-40.0, min(40.0, rng.gauss(0.0, 15.0)))
            self.mount_offset_mm = rng.uniform(-10.0, 20.0)  # > 0: the sensor sits lower than nominal
            self.tilt = math.radians(rng.uniform(0.0, 6.0))
            self.pile_mm = rng.uniform(5.0, 40.0)  # height of the pile's peak above its mean surface
        else:
            self.depth_mm, self.mount_offset_mm, self.tilt, self.pile_mm = depth_mm, 0.0, 0.0, 0.0
        self.pile_phase = rng.uniform(0.0, 2 * math.pi)
        self.days_to_fill = days_to_fill or rng.uniform(2.0, 6.0)
        self.collect_every_days = collect_every_days or rng.choice((2, 3, 3.5, 7))
        level = rng.uniform(0.0, 0.6)
        self.next_collection = t0 + rng.uniform(0.2, self.collect_every_days) * DAY
        self.t = t0
        self.on_schedule = True  # False: collected only when collect_at() says (a policy drives the trucks)
        self.full_times = []  # when the level rose through full
        # the level runs in straight segments: one per STEP_S cell of absolute time (its own speed
        # and noise), cut again where a truck empties the bin; where it stands is worked out from
        # the segment, so the world is the same however often anyone looks at it
        self._cell_end = t0  # the first advance draws the first cell
        self._slope = 0.0  # level per second in this segment
        self._seg_t, self._seg_level = t0, level
        self._overflow_closed = 0.0  # overflow of the segments before this one
        self._level = level
        self.hot_until = -1.0  # a hot object smouldering inside
        self.tilted_until = -1.0

    def rate_per_s(self, t):
        """Filling speed: busy in the day, quiet at night, more at weekends, never negative."""
        shape = _SHAPES.get(t)
        if shape is None:
            shape = _shape(t)
            if len(_SHAPES) >= _SHAPES_MAX:
                _SHAPES.clear()
            _SHAPES[t] = shape
        return shape / (self.days_to_fill * DAY) / 0.83  # 0.83: mean of daily*weekly shape

    STEP_S = 600.0  # how long the filling speed and its noise hold

    @property
    def level(self):
        return self._level

    @level.setter
    def level(self, value):
        """The bin holds `value` from now on (a test, or waste tipped in by hand)."""
        self._cut(value)

    @property
    def overflow_s(self):
        """Time spent at or above full (level >= 1) until self.t."""
        return self._overflow_closed + self._segment_overflow(self.t)

    def advance(self, t):
        """Moves to time t; returns the collections on the way as (time, fill level before).

        Where the bin stands at any time depends only on its seed and its collections, not on
        the times it was advanced to: a fleet looked at hourly and one looked at only when the
        trucks come fill alike (tests/test_simulator.py)."""
        collected = []
        while self.t < t:
            if self.t >= self._cell_end:
                self._new_cell()
            end = self._cell_end if self._cell_end < t else t  # min(): the hot loop of every simulation
            if self.next_collection <= end:
                self._move(max(self.t, self.next_collection))
                collected.append((self.t, self._level))
                self._cut(self.rng.uniform(0.0, 0.03))  # some litter stays behind
                self.pile_phase = self.rng.uniform(0.0, 2 * math.pi)
                self.next_collection = (self.t + self.collect_every_days * DAY * self.rng.uniform(0.9, 1.1)
                                        if self.on_schedule else math.inf)
                continue
            self._move(end)
        return collected

    def _new_cell(self):
        """The next STEP_S of absolute time: its filling speed and a noise of 0.5..1.5 on it
        (random.uniform(0.5, 1.5) written out: 0.5 + 1.0 * random(), one call fewer)."""
        t = self.t
        self._cut(self._level)
        self._cell_end = (math.floor(t / self.STEP_S) + 1) * self.STEP_S
        self._slope = self.rate_per_s(t) * (0.5 + self.rng.random())

    def _cut(self, level):
        """A new segment from self.t at `level`, the current one's overflow kept."""
        self._overflow_closed += self._segment_overflow(self.t)
        self._seg_t, self._seg_level, self._level = self.t, level, level

    def _move(self, t):
        level = self._seg_level + self._slope * (t - self._seg_t)
        if not level < 1.2:  # min(1.2, level), NaN included
            level = 1.2
        if self._level < 1.0 <= level:
            self.full_times.append(self._seg_t + (1.0 - self._seg_level) / self._slope)
        self.t, self._level = t, level

    def _segment_overflow(self, until):
        if self._seg_level >= 1.0:
            return until - self._seg_t
        if self._slope <= 0.0:
            return 0.0
        s = until - (self._seg_t + (1.0 - self._seg_level) / self._slope)
        return s if s > 0.0 else 0.0  # max(0.0, s), NaN included

    def collect_at(self, t):
        """A truck empties the bin at t (the earliest of what is already planned and t)."""
        self.next_collection = min(self.next_collection, t)

    def mean_surface_mm(self):
        """Distance from the nominal sensor position down to the waste's mean surface."""
        return self.depth_mm - self.level * (self.depth_mm - self.full_mm)

    def surface_mm(self):
        """What the beam meets first: the pile's peak (which moves as bags land), seen from where
        the sensor really is, along its tilted axis."""
        peak = self.pile_mm * (0.5 + 0.5 * math.sin(self.pile_phase + 9.0 * self.level)) if self.level > 0.02 else 0.0
        return (self.mean_surface_mm() - peak - self.mount_offset_mm) / math.cos(self.tilt)

    def true_fill_pct(self):
        return max(0.0, min(100.0, 100.0 * self.level))


class UltrasonicSensor:
    """What a JSN-SR04T-class sensor reports for a surface at distance d through air at T."""

    def __init__(self, rng, noise_mm=4.0, p_spurious=0.03, p_no_echo=0.02, blind_mm=None, max_mm=4500, rh=None):
        self.rng = rng
        if blind_mm is None:  # JSN-SR04T: 23-25 cm, this unit's own edge
            blind_mm = rng.uniform(230.0, 250.0)
        self.rh = rng.uniform(0.6, 0.95) if rh is None else rh  # relative humidity of the air in the bin
        self.noise_mm = noise_mm
        self.p_spurious = p_spurious
        self.p_no_echo = p_no_echo
        self.blind_mm = blind_mm
        self.max_mm = max_mm
        self.broken = False  # a dead or covered sensor: nothing comes back
        self._sound = (None, None)  # (air degC, speed of sound there): the last one worked out

    def echo_us(self, surface_mm, air_c, timeout_us):
        """Echo pulse width (round trip), or -2 (no echo within the timeout) like time_pulse_us."""
        r = self.rng
        if self.broken or r.random() < self.p_no_echo or surface_mm > self.max_mm:
            return -2
        d = surface_mm
        if r.random() < self.p_spurious:
            d = r.uniform(self.blind_mm, max(self.blind_mm + 1, d))  # a stray echo off the wall or lid
        d += r.gauss(0.0, self.noise_mm)
        if d < self.blind_mm:
            return -2  # the echo returns while the transducer still rings: lost, not clamped
        sound = self._sound
        if sound[0] != air_c:  # a wake's pings are in the same air
            sound = self._sound = (air_c, speed_of_sound(air_c, self.rh))
        c = sound[1]  # m/s = mm/ms
        us = int(2 * d / c * 1000)
        return us if us <= timeout_us else -2

    def a02_frame(self, surface_mm, air_c):
        """One A02YYUW UART frame for the surface (its own processing assumes 343 m/s... and
        returns 0 when there is no target)."""
        us = self.echo_us(surface_mm, air_c, 60000)
        mm = 0 if us < 0 else int(us * 0.343 / 2)
        h, l = mm >> 8, mm & 0xFF
        return bytes([0xFF, h, l, (0xFF + h + l) & 0xFF])


# The cell: a Li-SOCl2 bobbin D cell with internal resistance, passivation and the cold
# (simulator/parts/cell.py; the flat 3.65 V cell it replaces could never brown a board out).
from binlink.sim.parts.cell import LiSOCl2Cell as Battery  # noqa: E402
