"""One uplink's record, walked through the pipeline's stages (pipeline.py), and the enums that
name what can become of it. Flags stay bits from the codec to the rendered message."""
from dataclasses import dataclass, field
from enum import Enum, StrEnum

from binlink.gateway.module_formats import Reception
from binlink.gateway.registry import Device


class Reason(StrEnum):
    """Why a frame was refused: the label of binlink_frames_rejected_total and the `reason` of a
    rejection notice. docs/protocol.md lists every one (a test holds the two together)."""
    CRC = "crc"
    OVERSIZE = "oversize"
    BAD_LINE = "bad_line"
    MODULE_ERROR = "module_error"
    TRUNCATED = "truncated"
    BAD_LENGTH = "bad_length"
    BAD_VERSION = "bad_version"
    BAD_TYPE = "bad_type"
    UNKNOWN_DEVICE = "unknown_device"
    BAD_TAG = "bad_tag"
    REPLAY = "replay"
    STALE_KEY = "stale_key"
    FCNT_GAP = "fcnt_gap"
    BAD_FIELD = "bad_field"
    STORAGE_FULL = "storage_full"


class Outcome(Enum):
    """What became of an uplink."""
    ACCEPTED = "accepted"  # its messages are in this group's commit
    STATUS = "status"  # a module's status line, no frame
    DUPLICATE = "duplicate"  # a copy of a frame accepted before, here or by a peer
    HELD = "held"  # no counter known here verifies it: kept until the bin's counter is found again
    CLAIMING = "claiming"  # verified; claimed fleet-wide with the rest of its group
    STANDBY = "standby"  # a peer claimed it first and has not stored it yet: taken over if it never does
    REJECTED = "rejected"


class Verdict(StrEnum):
    """The shared state's answer to a claim (shared_scripts.py's claim script returns these words)."""
    MINE = "claimed"  # one gateway alone, or a claim this gateway already holds
    OK = "ok"  # claimed now, fleet-wide: this gateway publishes it
    DUPLICATE = "duplicate"  # a peer stored it already
    PENDING = "pending"  # a peer claimed it and has not stored it yet
    REPLAY = "replay"
    STALE_KEY = "stale_key"
    LOCAL = "local"  # the shared state is away: this gateway decides on its own state


@dataclass(slots=True)
class Reading:
    """One calibrated reading: a reading frame's, or one entry of a backlog batch."""
    fcnt: int
    age_s: int  # measured this long before the frame was received
    distance_mm: int | None
    temperature_c: int | None
    battery_mv: int
    flags: int  # codec.F_* bits, the gateway's low-battery flag included
    valid_pings: int
    pings: int
    fill_pct: float | None = None  # None: the sensor reported a fault


@dataclass(slots=True)
class Uplink:
    source: str
    reception: Reception
    received_at: float
    header: tuple | None = None  # codec.parse_header's
    device: Device | None = None
    fcnt: int | None = None  # the full counter, once verified
    last_fcnt: int | None = None  # the device's counter before it (the fleet's, when it knew more)
    frame_type: int = 0  # codec.T_*
    readings: list = field(default_factory=list)  # Reading, decoded and calibrated
    hello: tuple | None = None  # (firmware version, reset cause, config hash) of a hello
    digest: str | None = None  # with shared state: what the fleet-wide claim names the frame by
    outcome: Outcome | None = None

    @property
    def frame(self):
        return self.reception.frame

    def newest(self):
        """(fcnt, fill %, flag bits) of its newest reading, for the fleet's bin state; None for a hello."""
        if not self.readings:
            return None
        r = max(self.readings, key=lambda r: r.fcnt)
        return r.fcnt, r.fill_pct, r.flags
