# One reading from several pings: median of the valid echoes, outliers dropped, the speed of
# sound corrected for the air temperature. No echo / out of range is a fault, never a level.
from binlink.wire import codec

OUTLIER_MM = 60  # a ping further than this from the median is a stray echo


def speed_of_sound(temp_c):
    return 331.3 + 0.606 * temp_c  # m/s


def median(values):
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def reading(samples, pings, temp_c, blind_mm, max_mm):
    """samples: ping() results (mm at 343 m/s or None). Returns (distance_mm or None, valid, flags)."""
    scale = speed_of_sound(20 if temp_c is None else temp_c) / 343.0
    valid = [s * scale for s in samples if s is not None]
    in_range = [v for v in valid if v <= max_mm]
    if not in_range:
        return None, 0, codec.F_SENSOR_FAULT
    m = median(in_range)
    kept = [v for v in in_range if abs(v - m) <= OUTLIER_MM]
    # most echoes must agree (and two at least), or the reading is noise
    if 2 * len(kept) <= len(in_range) or len(kept) < min(2, pings):
        return None, len(kept), codec.F_SENSOR_FAULT
    d = median(kept)
    if d < blind_mm:
        return blind_mm, len(kept), codec.F_BLIND_ZONE
    return int(d + 0.5), len(kept), 0


def pings(hw, sensor, cfg):
    """Powers the sensor (where a pin switches it) and pings it cfg pings times: ping() results."""
    power = cfg["sensor_power_pin"]
    if power >= 0:
        hw.pin_write(power, 1)
        hw.sleep_ms(150)  # JSN-SR04T needs ~100 ms after power-up
    samples = []
    try:
        for i in range(cfg["pings"]):
            if i:
                hw.sleep_ms(cfg["ping_gap_ms"])  # let the previous ping's echoes die out
            samples.append(sensor.ping())
    finally:
        if power >= 0:
            hw.pin_write(power, 0)
    return samples
