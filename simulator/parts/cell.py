"""A Li-SOCl2 bobbin D cell (Saft LS 33600 class) behind the board's regulator, and the ESP32's
brown-out detector watching the regulator's output (docs/hardware.md, "The cell", cites each number).

- Open-circuit voltage 3.67 V, flat over most of the capacity, falling over the last few per cent
  (Tadiran LTC technical brochure: "open-circuit voltage of 3.67 V"; Linden's Handbook of Batteries,
  4th ed., fig. 14.17a: flat discharge curve of a D bobbin cell, a sharp knee at the end).
- Capacity 17 Ah at +20 °C to 2.0 V (Saft LS 33600).
- Internal resistance for a pulse: R20 at +20 °C on a fresh cell, rising in the cold (Linden fig.
  14.17b: the loaded plateau voltage of a D bobbin cell falls with temperature, more at higher
  drain), with age and towards the end of the capacity.
- Passivation: a LiCl layer grows on the lithium anode while the cell rests (faster when warm) and
  adds a resistance that the load then breaks down within seconds — the "voltage delay", worse in
  the cold (swe.com "Lithium facts": voltage delay; axotron.se: a stored Tadiran cell's voltage
  under 5 mA recovers over 3-10 s, and more on a second load minutes later).
- The custom board's MCP1700 LDO: 3.3 V out, dropout ~178 mV at 250 mA (MCP1700 datasheet), so the
  ESP32 sees the cell's loaded voltage minus the dropout once the cell is below ~3.5 V.
- The ESP32's brown-out detector resets the chip below 2.43 V +/- 0.05 V (ESP-IDF Kconfig
  ESP_BROWNOUT_DET_LVL_SEL_0, the default; components/esp_system/port/soc/esp32/Kconfig.system).

The figures marked ASSUMED in docs/hardware.md have no published source found: the model's
shape follows the sources, its magnitudes are stated, and the tests pin the behaviour, not them."""
import math

CAPACITY_MAH = 17000.0  # Saft LS 33600 at +20 degC to 2.0 V
OCV_MV = 3670.0  # Tadiran LTC brochure: open-circuit voltage
R20_OHM = 1.5  # ASSUMED from the LS 33600 pulse rating (400 mA pulses above 3.0 V at +20 degC, not found in the corpus)
COLD_PER_C = math.log(3.0) / 40.0  # ASSUMED: 3x the resistance at -20 degC (Linden fig. 14.17b's shape)
AGE_PER_YEAR = 0.08  # ASSUMED: +8 % resistance a year in service
PASSIVE_OHM = 4.0  # ASSUMED: a fully grown layer at +20 degC (voltage delay below 3.0 V at ~150 mA)
PASSIVE_DAYS_20C = 30.0  # ASSUMED: layer growth time constant at +20 degC, halving per +10 degC
CLEAR_MAS = 30.0  # charge (mA*s) above CLEAR_MIN_MA that breaks a layer down to 1/e (axotron.se: 5 mA for 3-10 s = 15-50 mA*s)
CLEAR_MIN_MA = 1.0  # a sleeping board's microamps let the layer grow (crazell: 5-10 uA/cm2 passivate)
LDO_MV, LDO_DROP_OHM = 3300.0, 0.178 / 0.250  # MCP1700: 3.3 V, 178 mV dropout at 250 mA
BOD_MV = 2430.0  # ESP-IDF ESP_BROWNOUT_DET_LVL_SEL_0 (default): 2.43 V +/- 0.05


class LiSOCl2Cell:
    """temp_c() -> the cell's temperature (the bin's air). `used_mah` and `age_years` make an old
    cell; `passivation` (0..1) a stored one (1: months on the shelf)."""

    def __init__(self, capacity_mah=CAPACITY_MAH, used_mah=0.0, age_years=0.0, temp_c=None, passivation=0.0):
        self.capacity_mah = capacity_mah
        self.used_mah = used_mah
        self.age_years = age_years
        self.temp_c = temp_c or (lambda: 20.0)
        self.passivation = passivation
        self._held = None  # (cold factor, layer growth time constant ms): hold_temperature()
        self._fixed = (None,)  # (what it was made from, OCV, resistance without the layer): _plateau()
        self._held_up = None  # (current, layer, threshold) VDD last held up under: holds_up()

    def hold_temperature(self):
        """Takes the temperature now and keeps it until called again (the board calls it at each
        wake and each sleep: the air changes over hours, a wake lasts a second)."""
        t = self.temp_c()
        self._held_up = None
        self._held = (math.exp(COLD_PER_C * (20.0 - t)), PASSIVE_DAYS_20C * 86400000.0 * 2.0 ** ((20.0 - t) / 10.0))

    def _cold_tau(self, temp_c=None):
        if temp_c is None and self._held is not None:
            return self._held
        t = self.temp_c() if temp_c is None else temp_c
        return math.exp(COLD_PER_C * (20.0 - t)), PASSIVE_DAYS_20C * 86400000.0 * 2.0 ** ((20.0 - t) / 10.0)

    # capacity (the bench's accounting: SimDevice books each wake's integrated charge) ------------
    def draw(self, ma, seconds):
        self.used_mah += ma * seconds / 3600.0
        self._held_up = None

    def depth(self):
        return min(1.0, max(0.0, self.used_mah / self.capacity_mah))

    # voltage -------------------------------------------------------------------------------------
    def ocv_mv(self):
        """Flat until the last 5 %, then down to 2.0 V at the end of the capacity."""
        left = 1.0 - self.depth()
        if left >= 0.05:
            return OCV_MV - 50.0 * (1.0 - left)  # the plateau sags ~50 mV over the life
        return 2000.0 + (OCV_MV - 50.0 - 2000.0) * left / 0.05

    def _bulk_ohm(self, cold):
        """The resistance without the passivation layer."""
        r = R20_OHM * cold * (1.0 + AGE_PER_YEAR * self.age_years)
        d = self.depth()
        if d > 0.8:  # the resistance climbs towards the end of the capacity
            r *= 1.0 + 4.0 * (d - 0.8) / 0.2
        return r

    def resistance_ohm(self, temp_c=None):
        cold = self._cold_tau(temp_c)[0]
        return self._bulk_ohm(cold) + self.passivation * PASSIVE_OHM * cold

    def _plateau(self):
        """(OCV, bulk resistance, cold factor): the board asks at every step, and within a wake only
        the layer changes (the charge is booked after it, the temperature held), so they are kept
        while what they come from stays the same."""
        held = self._held
        if held is None:  # the temperature is read at each call
            cold = self._cold_tau()[0]
            return self.ocv_mv(), self._bulk_ohm(cold), cold
        key = (held, self.used_mah, self.capacity_mah, self.age_years)
        if self._fixed[0] != key:
            self._fixed = (key, self.ocv_mv(), self._bulk_ohm(held[0]), held[0])
        return self._fixed[1:]

    def terminal_mv(self, ma):
        ocv, bulk, cold = self._plateau()
        return max(0.0, ocv - ma * (bulk + self.passivation * PASSIVE_OHM * cold))

    def mv(self, ma=0.0):
        return int(self.terminal_mv(ma))

    def vdd_mv(self, ma, regulator=True):
        """What the ESP32's VDD pins see through the LDO (regulator=False: the chip on the cell)."""
        v = self.terminal_mv(ma)
        if not regulator:
            return v
        return min(LDO_MV, v - ma * LDO_DROP_OHM)

    def holds_up(self, ma, mv):
        """vdd_mv(ma) >= mv (the board asks at every step). With the temperature held, only the
        current and the layer change between draw()s, and VDD falls with either: with no more of
        both than it last held up under, it holds up again."""
        ok = self._held_up
        if ok is not None and ma <= ok[0] and self.passivation <= ok[1] and mv == ok[2] and self._held is not None:
            return True
        if self.vdd_mv(ma) < mv:
            return False
        self._held_up = (ma, self.passivation, mv)
        return True

    # passivation over time -----------------------------------------------------------------------
    def load(self, ma, ms):
        """`ms` at a constant `ma`: the layer grows at rest, the load above CLEAR_MIN_MA breaks it."""
        if ms <= 0:
            return
        held = self._held
        tau_ms = (held if held is not None else self._cold_tau())[1]
        x = ms / tau_ms
        p = 1.0 - (1.0 - self.passivation) * (1.0 - x if x < 1e-4 else math.exp(-x))
        if ma > CLEAR_MIN_MA:
            p *= math.exp(-(ma - CLEAR_MIN_MA) * ms / 1000.0 / CLEAR_MAS)
        self.passivation = p
