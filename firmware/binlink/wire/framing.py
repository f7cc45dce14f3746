# Serial framing: CRC-16/CCITT-FALSE appended, COBS-encoded, 0x00 delimiter before and after.
# COBS keeps 0x00 out of the payload, so a receiver resynchronises at the next 0x00 after
# noise, a dropped byte or a truncated frame. Shared by firmware (encode) and gateway (decode).
try:
    from binascii import crc_hqx as _crc_hqx  # CPython
except ImportError:
    _crc_hqx = None

DELIMITER = 0
MAX_FRAME = 255  # longest frame the deframer accepts; longer runs are noise


def crc16(data):
    if _crc_hqx is not None:
        return _crc_hqx(data, 0xFFFF)
    crc = 0xFFFF
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        crc &= 0xFFFF
    return crc


def cobs_encode(data):
    out = bytearray([0])
    code_at = 0
    code = 1
    for b in data:
        if b == 0:
            out[code_at] = code
            code_at = len(out)
            out.append(0)
            code = 1
        else:
            out.append(b)
            code += 1
            if code == 0xFF:
                out[code_at] = code
                code_at = len(out)
                out.append(0)
                code = 1
    out[code_at] = code
    return bytes(out)


def cobs_decode(data):
    """Returns the decoded bytes, or None when the block is not valid COBS."""
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0 or i + code > n:
            return None
        out.extend(data[i + 1 : i + code])
        i += code
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


def framed_len(n):
    """Bytes frame() writes for an n-byte payload: 2 delimiters, 2 CRC, COBS code bytes."""
    return n + 5 + (n + 2) // 254


def frame(payload):
    """Bytes to write on the serial line for one protocol frame.

    A delimiter on both sides: a frame cut short by a reset or unplug then ends at the next
    frame's leading 0x00 and costs only itself."""
    c = crc16(payload)
    return b"\x00" + cobs_encode(payload + bytes([c >> 8, c & 0xFF])) + b"\x00"


class Deframer:
    """Incremental deframer: feed() any chunk, get back a list of (kind, bytes, trailer).

    kind is "frame" for a payload whose CRC matched, or a rejection reason: "crc" (CRC mismatch or
    invalid COBS), "oversize" (no delimiter within max_frame bytes). With trailer=True the byte
    right after a frame's closing delimiter belongs to that frame (the RSSI byte an EBYTE E22
    appends); it is returned as the third item, else None. A 0x00 there means no trailer was sent."""

    def __init__(self, max_frame=MAX_FRAME, trailer=False):
        self._buf = bytearray()
        self._limit = max_frame + max_frame // 254 + 4  # COBS overhead + CRC
        self._skipping = False
        self._trailer = trailer
        self._awaiting = None  # frame waiting for its trailer byte

    def feed(self, data):
        out = []
        blocks = bytes(data).split(b"\x00")
        last = len(blocks) - 1  # the last block is not ended by a delimiter yet
        for i, block in enumerate(blocks):
            ended = i < last
            if self._awaiting is not None:  # the byte after a frame's closing delimiter
                if not (block or ended):
                    break  # it comes with the next chunk
                out.append(("frame", self._awaiting, block[0] if block else None))  # a 0x00: none sent
                self._awaiting = None
                block = block[1:]
            if self._skipping:  # an over-long run, dropped up to its delimiter
                self._skipping = not ended
                continue
            if not ended:
                self._buf.extend(block)
                if len(self._buf) > self._limit:
                    out.append(("oversize", bytes(self._buf[:16]), None))
                    self._buf = bytearray()
                    self._skipping = True
                break
            if self._buf:
                self._buf.extend(block)
                block = bytes(self._buf)
                self._buf = bytearray()
            if len(block) > self._limit:
                out.append(("oversize", block[:16], None))
            elif block:
                kind, body = _check(block)
                if kind == "frame" and self._trailer:
                    self._awaiting = body
                else:
                    out.append((kind, body, None))
        return out

    def pending(self):
        return len(self._buf)


def _check(block):
    raw = cobs_decode(block)
    if raw is None or len(raw) < 3:
        return ("crc", block)
    body = raw[:-2]
    if crc16(body) != (raw[-2] << 8) | raw[-1]:
        return ("crc", block)
    return ("frame", body)
