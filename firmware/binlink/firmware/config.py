# Device configuration: one JSON file written at provisioning (`binlink provision`, `make flash`).
# Missing or broken entries fall back to safe defaults, reported in `problems`.
import json
import hashlib

DEFAULTS = {
    "device_id": None,  # required: 24-bit int
    "key": None,  # required: 32 hex digits
    "sensor": "jsn-sr04t",  # jsn-sr04t | hc-sr04 | a02yyuw
    "trig_pin": 5,
    "echo_pin": 18,
    "sensor_power_pin": 23,  # switched sensor rail (an idle JSN-SR04T draws ~5 mA); -1: always powered
    "sensor_uart": [2, 9600, 17, 16],  # A02YYUW: uart id, baud, tx, rx
    "temp_pin": 4,  # DS18B20
    "temp_bits": 9,  # 0.5 °C in 94 ms: plenty for sound speed and fire; 12 bits costs 750 ms awake
    "battery_pin": 35,
    "battery_en_pin": 19,  # switches the battery divider in for the reading (2 x 100 kOhm: ~18 uA); -1: always in
    "tilt_pin": -1,  # tilt switch to GND; -1: none
    "pings": 5,
    "ping_gap_ms": 60,
    "blind_mm": 250,
    "max_mm": 4500,
    "depth_mm": 1200,  # sensor to floor: for the reporting decision only (the gateway calibrates)
    "full_mm": 250,
    "transport": "e22",  # e22 | e32 | rylr998 | serial | wifi
    "radio_uart": None,  # [uart id, baud, tx, rx]; default [1, 9600, 26, 27], RYLR998 at its 115200
    "radio_m0_pin": 25,  # EBYTE mode pins and AUX (busy) output; -1: not wired
    "radio_m1_pin": 14,
    "radio_aux_pin": 13,
    "rylr_addr": 0,  # RYLR998 destination address (0 = broadcast)
    "rylr_band_hz": 866125000,  # RYLR998 centre frequency: EU868 865-868 MHz band, off the LoRaWAN channels
    "radio_netid": 18,  # E22 NETID / RYLR998 NETWORKID (RYLR998: 3-15 or 18)
    "radio_channel": -1,  # EBYTE channel; -1: 866.125 MHz (E22 16) / 866 MHz (E32 4), off the LoRaWAN channels
    "antenna_dbi": 2.15,  # antenna gain: the module's power is chosen for <= 14 dBm ERP
    "sf": 9,  # LoRa spreading factor, for time on air and the duty cycle
    "bandwidth_khz": 125,
    "duty_cycle": 0.01,  # at most the sub-band's (SUB_BANDS)
    "wifi_ssid": "",
    "wifi_password": "",
    "mqtt_host": "",
    "mqtt_port": 1883,
    "mqtt_user": "",
    "mqtt_password": "",
    "mqtt_topic": "binlink/uplink",
    "mqtt_downlink_topic": "binlink/downlink",  # answers arrive on <this>/<device id, 6 hex digits>
    "wake_s": 900,  # how often the bin wakes to measure
    "report_s": 3600,  # longest time between reports
    "report_near_full_s": 900,  # ... once the bin is near full
    "near_full_pct": 75,
    "change_mm": 100,  # report early when the level moved this much
    "fire_c": 70,
    "low_battery_mv": 3300,
    "backlog_per_frame": 4,  # readings per backlog batch (51-byte payload at SF12)
    "listen_every": 6,  # listen for a downlink after every Nth report (and with a backlog, clock or settings stale)
    "nvs_every": 16,  # counter written to flash every N frames (skip N after power loss)
    "wdt_ms": 30000,
}
CHOICES = {"transport": ("e22", "e32", "rylr998", "serial", "wifi"), "sensor": ("jsn-sr04t", "hc-sr04", "a02yyuw")}
SAFE_SLEEP_S = 3600  # sleep for this long when the configuration is unusable
# ESP32 pins of the RTC domain (Technical Reference Manual, "RTC IO MUX"): only these wake the chip
# (ext0) or keep a level through deep sleep; 34-39 are inputs only
RTC_GPIO = (0, 2, 4, 12, 13, 14, 15, 25, 26, 27, 32, 33, 34, 35, 36, 37, 38, 39)
INPUT_ONLY = (34, 35, 36, 37, 38, 39)
WDT_MS = (1000, 120000)  # machine.WDT refuses less than 1 s; more would leave a hung wake awake for minutes


STORED_KEY = "settings"  # NVS blob: settings a downlink changed, JSON + 4 bytes of its SHA-256
STORED_MAX = 256


def stored(hw, cfg, chash):
    """Puts the settings a downlink changed (validated before they were stored) over the config
    file's, and returns them ({} when none). They count only over the config file they were made
    over: a bin re-provisioned with a new file runs that file. A blob that does not check out is
    ignored."""
    blob = hw.nvs_get_blob(STORED_KEY, STORED_MAX)
    if not blob or len(blob) < 5 or hashlib.sha256(blob[:-4]).digest()[:4] != blob[-4:]:
        return {}
    doc = json.loads(blob[:-4])
    if doc.get("over") != chash.hex():
        return {}
    given = doc.get("s") or {}
    for k in given:
        if k in cfg and type(given[k]) is int:
            cfg[k] = given[k]
    return given


def store(hw, chash, settings):
    """Keeps {name: value} (every setting downlinks changed) across resets and power loss, in one
    NVS entry (written whole or not at all)."""
    raw = json.dumps({"over": chash.hex(), "s": settings}).encode()
    hw.nvs_set_blob(STORED_KEY, raw + hashlib.sha256(raw).digest()[:4])


def load(path="/config.json"):
    """Returns (config dict, config hash bytes(4), problems list)."""
    problems = []
    raw = b""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        given = json.loads(raw)
        if not isinstance(given, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as e:
        problems.append("config %s unreadable: %s" % (path, e))
        given = {}
    return parse(given, raw, problems)


def parse(given, raw=b"", problems=None):
    problems = problems if problems is not None else []
    cfg = dict(DEFAULTS)
    for k, v in given.items():
        if k not in DEFAULTS:
            problems.append("unknown key %s" % k)
        elif DEFAULTS[k] is not None and type(v) is not type(DEFAULTS[k]) and not (
            isinstance(DEFAULTS[k], float) and isinstance(v, int)
        ):
            problems.append("%s: wrong type, using default" % k)
        else:
            cfg[k] = v
    dev = cfg["device_id"]
    if not isinstance(dev, int) or not 0 <= dev <= 0xFFFFFF:
        problems.append("device_id missing or out of range")
        cfg["device_id"] = None
    key = cfg["key"]
    try:
        cfg["key"] = bytes.fromhex(key) if isinstance(key, str) and len(key) == 32 else None
    except ValueError:
        cfg["key"] = None
    if cfg["key"] is None:
        problems.append("key missing or not 32 hex digits")
    if cfg["temp_bits"] not in (9, 10, 11, 12):
        problems.append("temp_bits must be 9..12")
        cfg["temp_bits"] = DEFAULTS["temp_bits"]
    for k in ("transport", "sensor"):
        if cfg[k] not in CHOICES[k]:
            problems.append("%s must be one of %s, not %r" % (k, "/".join(CHOICES[k]), cfg[k]))
            cfg[k] = DEFAULTS[k]
    ru = cfg["radio_uart"]
    if ru is not None and not (isinstance(ru, list) and len(ru) == 4 and all(type(x) is int for x in ru)):
        problems.append("radio_uart must be [uart id, baud, tx pin, rx pin]")
        ru = None
    if ru is None:  # the module's factory rate: RYLR998 115200, EBYTE 9600
        ru = [1, 115200 if cfg["transport"] == "rylr998" else 9600, 26, 27]
    cfg["radio_uart"] = ru
    if cfg["sf"] not in (7, 8, 9, 10, 11, 12):
        problems.append("sf must be 7..12")
        cfg["sf"] = DEFAULTS["sf"]
    if cfg["bandwidth_khz"] not in (125, 250, 500):
        problems.append("bandwidth_khz must be 125, 250 or 500")
        cfg["bandwidth_khz"] = DEFAULTS["bandwidth_khz"]
    _radio_settings(cfg, problems)
    _channel(cfg, problems)
    if cfg["pings"] < 1 or cfg["pings"] > 15:
        problems.append("pings must be 1..15")
        cfg["pings"] = DEFAULTS["pings"]
    if not WDT_MS[0] <= cfg["wdt_ms"] <= WDT_MS[1]:
        problems.append("wdt_ms must be %d..%d" % WDT_MS)
        cfg["wdt_ms"] = DEFAULTS["wdt_ms"]
    _rtc_pin(cfg, "tilt_pin", "wake the board from deep sleep", True, problems)
    if cfg["transport"] in ("e22", "e32"):  # the module's mode pins hold it asleep through deep sleep
        for k in ("radio_m0_pin", "radio_m1_pin"):
            _rtc_pin(cfg, k, "hold the radio asleep through deep sleep", False, problems)
        _rtc_pin(cfg, "radio_aux_pin", "wake the board from light sleep on AUX", True, problems)  # ext0: RTC pads only
    return cfg, hashlib.sha256(raw).digest()[:4], problems


# EU868 sub-bands for non-specific short-range devices (ERC Recommendation 70-03 annex 1 bands
# h1.4-h1.7 and 869.7-870; ETSI EN 300 220-2): (low MHz, high MHz, ERP dBm, duty cycle)
SUB_BANDS = ((865.0, 868.0, 14, 0.01), (868.0, 868.6, 14, 0.01), (868.7, 869.2, 14, 0.001),
             (869.4, 869.65, 27, 0.1), (869.7, 870.0, 14, 0.01))
# LoRaWAN EU868: the three default channels, RX2, and the five a network commonly adds (TTN):
# a city is full of their traffic, a bin on them collides with it
LORAWAN_MHZ = (868.1, 868.3, 868.5, 869.525, 867.1, 867.3, 867.5, 867.7, 867.9)
DEFAULT_CHANNEL = {"e22": 16, "e32": 4}  # 850.125 + 16 = 866.125 MHz; 862 + 4 = 866 MHz


def channel_mhz(cfg):
    t = cfg["transport"]
    if t == "e22":
        return 850.125 + cfg["radio_channel"]
    if t == "e32":
        return 862.0 + cfg["radio_channel"]
    if t == "rylr998":
        return cfg["rylr_band_hz"] / 1e6
    return None


def sub_band(cfg):
    """The SUB_BANDS entry the radio's whole channel (centre +/- half the bandwidth) lies in, or None."""
    f = channel_mhz(cfg)
    if f is None:
        return None
    half = cfg["bandwidth_khz"] / 2000.0
    for b in SUB_BANDS:
        if b[0] <= f - half and f + half <= b[1]:
            return b
    return None


def erp_dbm(cfg):
    b = sub_band(cfg)
    return 14 if b is None else b[2]


def _channel(cfg, problems):
    """The radio's channel inside one sub-band, the duty cycle within its rule (the power:
    erp_dbm()); a LoRaWAN channel overlapped is said."""
    t = cfg["transport"]
    if t in DEFAULT_CHANNEL and cfg["radio_channel"] < 0:
        cfg["radio_channel"] = DEFAULT_CHANNEL[t]
    f = channel_mhz(cfg)
    if f is None:
        return
    half = cfg["bandwidth_khz"] / 2000.0
    band = sub_band(cfg)
    if band is None:
        problems.append("channel %.4f MHz is not inside one EU868 sub-band: using the default" % f)
        if t in DEFAULT_CHANNEL:
            cfg["radio_channel"] = DEFAULT_CHANNEL[t]
        else:
            cfg["rylr_band_hz"] = DEFAULTS["rylr_band_hz"]
        return _channel(cfg, problems)
    if cfg["duty_cycle"] > band[3]:
        problems.append("duty_cycle %s above the sub-band's %s" % (cfg["duty_cycle"], band[3]))
        cfg["duty_cycle"] = band[3]
    for c in LORAWAN_MHZ:
        if abs(f - c) < half + 0.0625:
            problems.append("channel %.4f MHz overlaps the LoRaWAN channel %.3f MHz" % (f, c))


# spreading factor / bandwidth a transport can carry: RYLR998 refuses SF10-12 at 125 kHz (SF7-9),
# SF11-12 at 250 kHz, SF12 at 500 kHz (its AT command guide); EBYTE's air rates are 125 kHz only
RYLR_MAX_SF = {125: 9, 250: 10, 500: 11}


def _radio_settings(cfg, problems):
    t, sf, bw = cfg["transport"], cfg["sf"], cfg["bandwidth_khz"]
    if t in ("e22", "e32") and bw != 125:
        problems.append("bandwidth_khz %d: EBYTE air rates are at 125 kHz" % bw)
        cfg["bandwidth_khz"] = 125
    elif t == "rylr998" and sf > RYLR_MAX_SF[bw]:
        problems.append("sf %d at %d kHz: RYLR998 takes SF7-%d there" % (sf, bw, RYLR_MAX_SF[bw]))
        cfg["sf"] = RYLR_MAX_SF[bw]


def usable(cfg):
    return cfg["device_id"] is not None and cfg["key"] is not None


def _rtc_pin(cfg, k, job, may_be_input, problems):
    pin = cfg[k]
    if pin != -1 and (pin not in RTC_GPIO or (not may_be_input and pin in INPUT_ONLY)):
        problems.append("%s %d cannot %s: not an RTC-capable %s" % (k, pin, job, "GPIO" if may_be_input else "output"))
        cfg[k] = DEFAULTS[k]
