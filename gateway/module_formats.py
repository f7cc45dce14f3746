"""Radio module formats: one decoder per serial format behind one interface (as rtl_433 does).

Each decoder turns a byte stream, fed in any chunking, into Receptions: a protocol frame with
the signal figures the module reported, or a rejection with its reason code."""
from dataclasses import dataclass

from binlink.wire.framing import Deframer, frame as framed


@dataclass(slots=True)  # slots, not frozen: a burst queues thousands of them, and a frozen __init__ costs 3x
class Reception:
    frame: bytes | None  # protocol frame (None for a rejection or a status line)
    reason: str | None = None  # rejection reason or status ("crc", "oversize", "bad_line", "module_error")
    rssi: int | None = None  # dBm
    snr: float | None = None  # dB
    detail: str = ""
    addr: int | None = None  # RYLR998: the sender's module address (+RCV's first field), where an answer goes


class RawFormat:
    """Wired ESP32 or an EBYTE E22/E32 in transparent mode: COBS + CRC frames on the byte stream."""

    name = "raw"
    trailer = False

    def __init__(self):
        self._deframer = Deframer(trailer=self.trailer)

    def feed(self, data):
        out = []
        for kind, body, extra in self._deframer.feed(data):
            if kind == "frame":
                out.append(Reception(body, rssi=self._rssi(extra)))
            else:
                out.append(Reception(None, kind, detail=body[:16].hex()))
        return out

    def _rssi(self, extra):
        return None


class RawRssiFormat(RawFormat):
    """EBYTE E22 with REG3 bit 7 set: one RSSI byte after each packet, dBm = -(256 - value)."""

    name = "raw+rssi"
    trailer = True

    def _rssi(self, extra):
        return None if not extra else -(256 - extra)  # 0 would be -256 dBm, which no receiver reports: unknown


class Rylr998Format:
    """REYAX RYLR896/RYLR998: `+RCV=<addr>,<len>,<data>,<rssi>,<snr>` lines, data as ASCII hex."""

    name = "rylr998"
    MAX_LINE = 600  # 240 data characters plus the envelope, with room to spare
    # wider than any LoRa receiver reports (SX127x/SX126x: RSSI about -150..0 dBm, SNR -20..+15 dB)
    RSSI_MIN, RSSI_MAX = -200, 50
    SNR_MIN, SNR_MAX = -50.0, 50.0

    def __init__(self):
        self._buf = bytearray()
        self._overflow = False

    def feed(self, data):
        out = []
        self._buf.extend(data)
        while True:
            i = self._buf.find(b"\n")
            if i < 0:
                if len(self._buf) > self.MAX_LINE:
                    out.append(Reception(None, "oversize", detail=bytes(self._buf[:32]).hex()))
                    self._buf.clear()
                    self._overflow = True
                return out
            line = bytes(self._buf[:i]).strip(b"\r \t")
            del self._buf[: i + 1]
            if self._overflow:  # tail of an over-long line: already reported
                self._overflow = False
                continue
            if line:
                out.append(self._line(line))

    def _line(self, raw):
        try:
            line = raw.decode("ascii")
        except UnicodeDecodeError:
            return Reception(None, "bad_line", detail=raw[:32].hex())
        if line in ("+OK", "+READY"):
            return Reception(None, "status", detail=line)
        if line.startswith("+ERR="):
            return Reception(None, "module_error", detail=line)
        if not line.startswith("+RCV="):
            return Reception(None, "bad_line", detail=line[:64])
        head = line[5:].split(",", 2)
        tail = head[-1].rsplit(",", 2) if len(head) == 3 else []
        if len(tail) != 3:
            return Reception(None, "bad_line", detail=line[:64])
        addr, length = head[0], head[1]
        payload, rssi, snr = tail
        try:
            sender = int(addr)
            n = int(length)
            rssi_dbm = int(rssi)
            snr_db = float(snr)
        except ValueError:
            return Reception(None, "bad_line", detail=line[:64])
        if not (self.RSSI_MIN <= rssi_dbm <= self.RSSI_MAX and self.SNR_MIN <= snr_db <= self.SNR_MAX):  # NaN fails too
            return Reception(None, "bad_line", detail="rssi %s or snr %s out of range" % (rssi[:8], snr[:8]))
        if n != len(payload):
            return Reception(None, "truncated", detail="length %d, %d data characters" % (n, len(payload)))
        try:
            frame = bytes.fromhex(payload)
        except ValueError:
            return Reception(None, "bad_line", detail="data is not hex")
        return Reception(frame, rssi=rssi_dbm, snr=snr_db, addr=sender)


FORMATS = {f.name: f for f in (RawFormat, RawRssiFormat, Rylr998Format)}


def make(name):
    try:
        return FORMATS[name]()
    except KeyError:
        raise ValueError("unknown module format %r (known: %s)" % (name, ", ".join(sorted(FORMATS)))) from None


def rylr998_line(frame, addr=1, rssi=-80, snr=9.5):
    """What a RYLR998 prints for a received frame (the simulator writes this; tests parse it)."""
    data = frame.hex().upper()
    return ("+RCV=%d,%d,%s,%d,%s\r\n" % (addr, len(data), data, rssi, snr)).encode()


RYLR998_OVERHEAD = 8  # the module adds 8 bytes to the payload on air (REYAX AT command guide)
RYLR998_PREAMBLE = 12  # its programmed preamble (PARAMETER's 4th field), which the bins set too


def transmission(format_name, frame, addr=None):
    """How a downlink goes out through a module: (bytes to write to its serial port, payload bytes
    on air, preamble symbols). The mirror of what each format reads: raw / raw+rssi (an EBYTE
    E22/E32 in transparent mode sends what it is given) COBS + CRC framed; rylr998 an AT+SEND to
    the address the uplink came from, the frame as upper-case ASCII hex, as the bins send theirs."""
    if format_name == Rylr998Format.name:
        data = frame.hex().upper().encode()
        return (b"AT+SEND=%d,%d,%s\r\n" % (addr or 0, len(data), data), len(data) + RYLR998_OVERHEAD,
                RYLR998_PREAMBLE)
    out = framed(frame)
    return out, len(out), 8
