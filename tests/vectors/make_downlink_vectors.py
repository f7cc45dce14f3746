"""Regenerates tests/vectors/downlink.json from binlink.wire.downlink (after a deliberate format
change). Keys are TEST KEYS, public on purpose; never use them on a real bin."""
import json
import os

from binlink.wire import codec
from binlink.wire import downlink as d

KEY = bytes(range(16))  # TEST KEY 000102030405060708090a0b0c0d0e0f
OUT = os.path.join(os.path.dirname(__file__), "downlink.json")
DEV, ANSWERED = 0xA1, 70000


def vector(name, frame, answered=ANSWERED, device=DEV):
    v = {"name": name, "key_hex": KEY.hex(), "device_id": device, "answered_fcnt": answered, "frame_hex": frame.hex()}
    try:
        got = d.parse(frame, KEY, device, answered)
    except codec.ProtocolError as e:
        v["reject"] = e.reason
        return v
    v["parsed"] = {k: (val if k != "config" else [val[0].hex(), val[1]]) for k, val in got.items()}
    return v


def build():
    settings = {"report_s": 1800, "fire_c": 65}
    full = d.encode(KEY, DEV, ANSWERED, ack=0b1011, time_ms=1764900000123, config=(d.settings_hash(settings), settings))
    ack = d.encode(KEY, DEV, ANSWERED, ack=1)
    recorded = d.encode(KEY, DEV, ANSWERED - 1, ack=1)
    uplink = codec.encode_reading(KEY, DEV, ANSWERED, 812, 21, 3712, 0, 5, 5)
    head = codec._header(d.T_DOWNLINK, DEV, ANSWERED)
    twice = head + bytes([d.C_ACK, 0, 0, 0, 1, d.C_ACK, 0, 0, 0, 1])
    bad_setting = head + bytes([d.C_CONFIG, 1, 2, 3, 4, 1, 6]) + (200).to_bytes(4, "big")
    paced = codec._header(d.T_DOWNLINK, DEV, ANSWERED + 1)
    pace_5 = paced + bytes([d.C_PACE, 0, 5])
    pace_short = paced + bytes([d.C_PACE, 0])
    echo_3 = head + bytes([d.C_ACK, 0, 0, 0, 1, d.C_ECHO, 3])
    return [
        vector("ack_time_config", full),
        vector("ack_only", ack),
        vector("recorded_for_an_earlier_uplink", recorded),
        vector("another_bins", d.encode(KEY, 0xB2, ANSWERED, ack=1)),
        vector("an_uplink_reflected", uplink),
        vector("tag_flipped", ack[:-1] + bytes([ack[-1] ^ 1])),
        vector("truncated", ack[:8]),
        vector("command_twice", twice + d._tag(KEY, ANSWERED, twice)),
        vector("fire_at_200_c", bad_setting + d._tag(KEY, ANSWERED, bad_setting)),
        vector("ack_pace", d.encode(KEY, DEV, ANSWERED + 1, ack=1, pace_min=720), answered=ANSWERED + 1),
        vector("pace_below_ten_minutes", pace_5 + d._tag(KEY, ANSWERED + 1, pace_5), answered=ANSWERED + 1),
        vector("pace_cut_short", pace_short + d._tag(KEY, ANSWERED + 1, pace_short), answered=ANSWERED + 1),
        vector("ack_time_pace_echo", d.encode(KEY, DEV, ANSWERED, ack=3, time_ms=1764900000123, pace_min=755, echo=1)),
        vector("echo_of_3", echo_3 + d._tag(KEY, ANSWERED, echo_3)),
    ]


if __name__ == "__main__":
    with open(OUT, "w") as f:
        json.dump(build(), f, indent=1)
        f.write("\n")
    print("wrote", OUT)
