"""Regenerates tests/vectors/frames.json from the codec (run after a deliberate format change).

Keys here are TEST KEYS, public on purpose; never use them on a real bin."""
import json
import os

from binlink.wire import codec as c

KEY = bytes(range(16))  # TEST KEY 000102030405060708090a0b0c0d0e0f
KEY2 = bytes.fromhex("5445535420b1e57e57206b65792d3221")  # TEST KEY (second device)
OUT = os.path.join(os.path.dirname(__file__), "frames.json")


def valid(name, frame, key=KEY, last=None):
    v = {"name": name, "key_hex": key.hex(), "frame_hex": frame.hex()}
    if last is not None:
        v["last_fcnt"] = last
    v["decoded"] = c.decode(frame, key, last)
    return v


def reject(name, frame, reason, key=KEY, last=None):
    v = {"name": name, "key_hex": key.hex(), "frame_hex": frame.hex(), "reject": reason}
    if last is not None:
        v["last_fcnt"] = last
    try:
        c.decode(frame, key, last)
    except c.ProtocolError as e:
        assert e.reason == reason, (name, e.reason)
        return v
    raise AssertionError(name + " was accepted")


def flip(frame, i, bit=0):
    b = bytearray(frame)
    b[i] ^= 1 << bit
    return bytes(b)


def build():
    r = c.encode_reading(KEY, 0x0000A1, 42, 812, 21, 3712, 0, 5, 5)
    backlog3 = c.encode_backlog(KEY, 0x0000A1, 60, [
        (55, 300, c.pack_reading(1400, 12, 3700, 0, 5, 5)),
        (57, 180, c.pack_reading(1350, 14, 3690, 0, 4, 5)),
        (59, 60, c.pack_reading(1200, 15, 3690, c.F_LOW_BATTERY, 5, 5)),
    ])
    echo = c.encode_reading_body(KEY, 0xA1, 62, c.pack_reading(1080, 16, 3690, 0, 5, 5),
                                 [(61, 60, c.pack_reading(1100, 16, 3690, c.F_BACKLOG, 5, 5))])
    v = [
        valid("reading_normal", r),
        valid("reading_sensor_fault", c.encode_reading(KEY, 0xA1, 43, None, 18, 3700, c.F_SENSOR_FAULT, 0, 5)),
        valid("reading_blind_zone_full", c.encode_reading(KEY, 0xA1, 44, 250, 19, 3700, c.F_BLIND_ZONE, 5, 5)),
        valid("reading_fire_alarm", c.encode_reading(KEY, 0xA1, 45, 900, 87, 3650, c.F_FIRE | c.F_ALARM_WAKE, 5, 5)),
        valid("reading_tilt", c.encode_reading(KEY, 0xA1, 46, 3100, 20, 3650, c.F_TILT | c.F_ALARM_WAKE, 3, 5)),
        valid("reading_cold_low_battery", c.encode_reading(KEY, 0xA1, 47, 1500, -17, 3190, c.F_LOW_BATTERY, 4, 5)),
        valid("reading_no_temperature", c.encode_reading(KEY, 0xA1, 48, 1500, None, 3600, 0, 5, 5)),
        valid("reading_backlog_pending", c.encode_reading(KEY, 0xA1, 61, 1100, 16, 3690, c.F_BACKLOG, 5, 5)),
        valid("reading_counter_rollover", c.encode_reading(KEY, 0xA1, 0x10002, 1000, 20, 3600, 0, 5, 5), last=0xFFFE),
        valid("reading_counter_high_epoch", c.encode_reading(KEY, 0xA1, 0x30005, 1000, 20, 3600, 0, 5, 5), last=0x30001),
        valid("reading_max_device_id", c.encode_reading(KEY2, 0xFFFFFF, 1, 4000, 25, 4200, 0, 7, 7), key=KEY2),
        valid("reading_echo", echo),  # firmware 1.7.0: the reading, then its predecessor still unacknowledged
        valid("reading_echo_behind_a_batch", c.encode_reading_body(KEY, 0xA1, 70, c.pack_reading(900, 16, 3680, 0, 5, 5),
                                                                    [(66, 45, c.pack_reading(950, 16, 3680, c.F_ALARM_WAKE, 5, 5))])),
        valid("reading_two_echoes", c.encode_reading_body(KEY, 0xA1, 90, c.pack_reading(700, 12, 3660, 0, 5, 5),  # a lossy link
                                                           [(88, 120, c.pack_reading(760, 12, 3660, 0, 5, 5)),
                                                            (89, 60, c.pack_reading(730, 12, 3660, 0, 5, 5))])),
        valid("backlog_one", c.encode_backlog(KEY, 0xA1, 50, [(49, 15, c.pack_reading(1800, 10, 3700, 0, 5, 5))])),
        valid("backlog_three", backlog3),
        valid("hello_power_on", c.encode_hello(KEY, 0xA1, 0, (1, 0, 0), 1, bytes.fromhex("c0ffee01"))),
        valid("hello_watchdog", c.encode_hello(KEY, 0xA1, 64, (1, 2, 3), 3, bytes.fromhex("0badc0de"))),
        valid("hello_after_power_loss_skip", c.encode_hello(KEY, 0xA1, 132, (1, 0, 0), 6, b"\x00\x00\x00\x01"), last=70),
        valid("hello_v1_old_firmware", c.encode_hello(KEY, 0xA1, 65, (1, 0, 0), 4, b"\x00\x00\x00\x01", version=1), last=64),
        # resynchronisation: the full counter on air, whatever the gateway knew before
        valid("hello_resync_never_heard_counter_above_65536", c.encode_hello(KEY, 0xA1, 0x11170, (1, 1, 0), 4, b"\x12\x34\x56\x78")),
        valid("hello_resync_after_gap", c.encode_hello(KEY, 0xA1, 0x2A0001, (1, 1, 0), 4, b"\x12\x34\x56\x78"), last=10),
        reject("hello_resync_replayed", c.encode_hello(KEY, 0xA1, 0x11170, (1, 1, 0), 4, b"\x12\x34\x56\x78"), "replay", last=0x11170),
        reject("hello_resync_high_bits_forged", flip(c.encode_hello(KEY, 0xA1, 0x11170, (1, 1, 0), 4, b"\x12\x34\x56\x78"), 6, 0), "bad_tag"),
        reject("hello_v2_truncated_to_v1_length", c.encode_hello(KEY, 0xA1, 5, (1, 1, 0), 4, b"\x12\x34\x56\x78")[:18], "truncated"),
        reject("bad_tag_flipped_tag_bit", flip(r, 15, 3), "bad_tag"),
        reject("bad_tag_flipped_distance_bit", flip(r, 7, 0), "bad_tag"),
        reject("bad_tag_wrong_key", r, "bad_tag", key=KEY2),
        reject("bad_tag_device_id_changed", flip(r, 3, 1), "bad_tag"),
        reject("truncated_one_byte", r[:-1], "truncated"),
        reject("truncated_header", r[:3], "truncated"),
        reject("truncated_empty", b"", "truncated"),
        reject("truncated_backlog", backlog3[:-10], "truncated"),
        reject("bad_length_extra_byte", r + b"\x00", "bad_length"),
        reject("bad_version_4", bytes([0x41]) + r[1:], "bad_version"),
        reject("version_3_reading_with_one_echo", bytes([0x31]) + echo[1:], "truncated"),
        reject("echo_as_version_1", bytes([0x11]) + echo[1:], "bad_length"),
        reject("version_2_reading_without_echo", bytes([0x21]) + r[1:], "truncated"),
        reject("echo_offset_0", c._sign(KEY, 62, echo[:12] + b"\x00" + echo[13:-4]), "bad_field"),
        reject("echo_flipped_age_bit", flip(echo, 14, 0), "bad_tag"),
        reject("bad_version_2_backlog", bytes([0x22]) + backlog3[1:], "bad_version"),
        reject("bad_version_0", bytes([0x01]) + r[1:], "bad_version"),
        reject("bad_type_7", bytes([0x17]) + r[1:], "bad_type"),
        reject("replay_same_counter", r, "replay", last=42),
        reject("replay_older_counter", r, "replay", last=100),
        reject("fcnt_gap_too_large", c.encode_reading(KEY, 0xA1, 0x5000, 1000, 20, 3600, 0, 5, 5), "fcnt_gap", last=10),
        reject("empty_backlog", c.encode_backlog(KEY, 0xA1, 50, [(49, 1, c.pack_reading(1, 1, 3700, 0, 1, 1))])[:6] + b"\x00" + b"\x00" * 4, "bad_length"),
    ]
    return v


if __name__ == "__main__":
    with open(OUT, "w") as f:
        json.dump(build(), f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote", OUT)
