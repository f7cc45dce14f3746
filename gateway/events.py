"""Events from one reading compared with the bin's previous state.

Alarms fire on the rising edge (flag newly set), so a bin that stays tilted is one event, not one
per report. `emptied` is a fall of the fill level by more than a threshold: a pickup."""
from binlink.wire import codec

# flags that raise an event of the same name when newly set
ALARM_BITS = tuple((codec.flag_bits([name]), name) for name in ("fire", "tilt", "sensor_fault", "low_battery"))


def detect(prev_fill, prev_flags, fill, flags, rules):
    """Event names for a reading. flags, prev_flags: flag bits (codec.flag_bits); prev_*: the bin's
    last state (None when never seen)."""
    out = []
    if fill is not None and prev_fill is not None:
        if prev_fill - fill >= rules.emptied_drop_pct:
            out.append("emptied")
        if fill >= rules.full_pct > prev_fill:
            out.append("full")
    elif fill is not None and prev_fill is None and fill >= rules.full_pct:
        out.append("full")
    for bit, name in ALARM_BITS:
        if flags & bit and not (prev_flags or 0) & bit:
            out.append(name)
    return out
