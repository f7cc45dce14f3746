# LoRa time on air (Semtech AN1200.13) and the EU868 duty-cycle airtime budget.
# Shared by the firmware (duty cycle) and the simulator (channel occupancy, collisions).


def time_on_air_ms(payload_len, sf, bw_khz=125, cr=1, preamble=8, explicit_header=True, crc=True):
    """cr: 1..4 for coding rate 4/5..4/8. Low data rate optimisation on when a symbol lasts more
    than 16 ms (SX127x datasheet 4.1.1.6: SF11/12 at 125 kHz, SF12 at 250 kHz)."""
    t_sym = (1 << sf) / float(bw_khz)  # ms
    de = 1 if t_sym > 16 else 0
    ih = 0 if explicit_header else 1
    num = 8 * payload_len - 4 * sf + 28 + (16 if crc else 0) - 20 * ih
    den = 4 * (sf - 2 * de)
    n_payload = 8 + max(-(-num // den) * (cr + 4), 0)  # ceil
    return (preamble + 4.25) * t_sym + n_payload * t_sym


HOUR_S = 3600


def budget_cap_ms(duty_cycle):
    """Airtime a device may save up: a sixth of the hourly allowance (6 s at 1 %)."""
    return int(duty_cycle * HOUR_S * 1000 / 6)


def refill_ms(budget_ms, elapsed_s, duty_cycle):
    """Token bucket: it refills so that the cap plus an hour of refill is one hour's allowance,
    which keeps any sliding hour within the duty cycle (ETSI EN 300 220 counts per hour)."""
    cap = budget_cap_ms(duty_cycle)
    rate = (duty_cycle * HOUR_S * 1000 - cap) / HOUR_S  # ms of airtime per second
    if elapsed_s < 0:
        elapsed_s = 0
    b = budget_ms + elapsed_s * rate
    return int(cap if b > cap else b)
