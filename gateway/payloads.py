"""How a message's payload is stored in an outbox row, read back as the JSON that is published.

A reading's messages are binary records (0x02, integrate.py) the publisher renders. Other payloads
(hellos, notices, ...) are stored deflated against a preset dictionary of what the messages share
(keys, timestamp shape): ~400 bytes of JSON become ~80, and so were the readings' before 0.3 (those
rows stay readable). Rows say how they are stored by their first byte (JSON never starts with a
control byte). NEVER edit a dictionary: rows written with it could not be read back. A new one
needs a new prefix byte, and the old ones stay readable."""
import struct
import zlib

from binlink.gateway import integrate

_PACKED_V1 = b"\x00"  # 1 KB window, events only in the dictionary (the first 0.2 rows)
_ZDICT_V1 = (b'{"backlog":false,"battery_v":3.7,"bin_id":"","device":"","distance_mm":,"event":"uplink","fcnt":,'
             b'"fill_pct":,"flags":["low_battery"],"gateway":"","measured_at":"2026-11-27T00:00:00.000Z","message_id":"",'
             b'"pings":5,"problem":false,"received_at":"2026-11-27T00:00:00.000Z","rssi":-,"snr":,"source":"",'
             b'"temperature_c":,"time_synced":true,"valid_pings":5}')
_PACKED_V2 = b"\x01"  # 2 KB window; a bin state's shape (forecast, position) after the event's
_ZDICT_V2 = _ZDICT_V1 + (
    b'{"battery_v":3.7,"bin_id":"","device":"","distance_mm":,"fcnt":,"fill_pct":,"fill_rate_pct_per_day":,'
    b'"flags":[],"full_at":"2026-11-27T00:00:00.000Z","gateway":"","lat":,"lon":,"measured_at":"2026-11-27T00:00:00.000Z",'
    b'"name":"","pings":5,"problem":false,"received_at":"2026-11-27T00:00:00.000Z","rssi":-,"snr":,"source":"",'
    b'"temperature_c":,"time_synced":true,"valid_pings":5}')
_DICTS = {_PACKED_V1: (-10, _ZDICT_V1), _PACKED_V2: (-11, _ZDICT_V2)}
_PACKER = zlib.compressobj(6, zlib.DEFLATED, -11, 2, zdict=_ZDICT_V2)  # copied per payload: the dictionary is read once


def pack(payload):
    """Stored form of a payload: a reading's record as it is, JSON deflated."""
    if isinstance(payload, str):
        payload = payload.encode()
    elif payload[:1] == integrate.RECORD:
        return payload
    c = _PACKER.copy()
    return _PACKED_V2 + c.compress(payload) + c.flush()


def unpack(stored):
    """The payload as published: JSON."""
    if isinstance(stored, bytes) and stored[:1] == integrate.RECORD:
        return integrate.render(stored)
    if isinstance(stored, bytes) and stored[:1] in _DICTS:
        wbits, zdict = _DICTS[stored[:1]]
        d = zlib.decompressobj(wbits, zdict=zdict)
        return d.decompress(stored[1:]) + d.flush()
    return stored  # written before payloads were packed


def readable(stored):
    """unpack(stored), or None when the row is damaged (a salvaged page, a flipped bit): one bad
    row must not stop the publisher from reading the rows after it."""
    try:
        return unpack(stored)
    except (ValueError, IndexError, TypeError, struct.error, zlib.error):
        return None
