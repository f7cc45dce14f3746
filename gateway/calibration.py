"""Fill level from distance, per bin: 0 % at the floor (depth_mm), 100 % at full_mm."""
from binlink.wire import codec


def fill_pct(device, distance_mm, flags):
    """Fill percentage, clamped to 0..100; None when the sensor reported a fault (flags: codec bits)."""
    if flags & codec.F_SENSOR_FAULT or distance_mm is None:
        return None
    if flags & codec.F_BLIND_ZONE:
        return 100.0
    span = device.depth_mm - device.full_mm
    pct = 100.0 * (device.depth_mm - distance_mm) / span
    return round(min(100.0, max(0.0, pct)), 1)
