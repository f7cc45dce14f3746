"""Fill level from distance, per bin: 0 % at the floor (depth_mm), 100 % at full_mm."""


def fill_pct(device, reading):
    """Fill percentage, clamped to 0..100; None when the sensor reported a fault."""
    flags = reading["flags"]
    if "sensor_fault" in flags or reading["distance_mm"] is None:
        return None
    if "blind_zone" in flags:
        return 100.0
    span = device.depth_mm - device.full_mm
    pct = 100.0 * (device.depth_mm - reading["distance_mm"]) / span
    return round(min(100.0, max(0.0, pct)), 1)
