"""Trust in what the gateways read back from Redis (docs/gateway.md §5, threat model): nothing read
there is trusted as it stands. Registry entries are sealed with an HMAC-SHA256 under the site's
registry secret (a file every gateway of the site has, never in Redis), so a Redis writer cannot
swap a bin's key or add a bin; every other value is checked (a 32-bit counter, a key id, a bin
state, an index member) and one that fails is skipped, counted in
binlink_readback_rejected_total{source="redis"} and logged by its key: it never stops the gateway
or another bin. Keys and the secret are never logged."""
import hashlib
import hmac
import json
import logging
import re

import redis

from binlink.gateway import logs, registry

log = logs.get("shared")
UINT32_MAX = 2**32 - 1
_UINT = re.compile(r"[0-9]{1,10}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")


class Refused(Exception):
    """An entry read back from Redis that is not trusted; args: the reason (a metric label)."""


def uint32(text):
    """A 32-bit unsigned counter written by a gateway, else Refused."""
    if isinstance(text, str) and _UINT.fullmatch(text) and int(text) <= UINT32_MAX:
        return int(text)
    raise Refused("malformed")


def fleet_counter(epoch, key_id, fcnt):
    """(epoch, key_id, fcnt) of a bin's counter hash, else Refused."""
    epoch, fcnt = uint32(epoch), uint32(fcnt)
    if not (isinstance(key_id, str) and _KEY_ID.fullmatch(key_id)):
        raise Refused("malformed")
    return epoch, key_id, fcnt


def bin_state(fcnt, fill, flags):
    """(fcnt, fill or None, flags) of a bin's state hash as the claim returns it, else Refused."""
    try:
        fill = None if fill in (None, "") else float(fill)
    except ValueError:
        raise Refused("malformed") from None
    if fill is not None and not 0 <= fill <= 100 or not (isinstance(flags, str) and _UINT.fullmatch(flags)):
        raise Refused("malformed")  # "not 0 <= nan <= 100": nan and inf are refused too
    flags = int(flags)
    if flags > 255:
        raise Refused("malformed")
    return uint32(fcnt), fill, flags


def index_device_id(member):
    """A device id as the registry's index sets hold it (6 hex digits), else Refused."""
    try:
        return registry.parse_device_id(member)
    except ValueError:
        raise Refused("malformed") from None


class Trust:
    """Seals registry entries under the site's secret, unseals and checks them when read back, and
    counts and logs (rate-limited) every entry refused."""

    def __init__(self, secret, metrics, clock):
        self.secret = secret  # the same at every gateway of the site
        self.metrics = metrics
        self.clock = clock
        self._refusals_logged = logs.RateLimit(per_minute=10)

    def refused(self, key, reason):
        """An entry of Redis not used: counted, and logged (rate-limited) by its key, never its value."""
        self.metrics.readback_rejected.labels("redis", reason).inc()
        if self._refusals_logged.allow(reason, self.clock()):
            logs.event(log, logging.WARNING, "shared state entry refused", key=key, reason=reason)

    def trusted(self, key, parse, *args):
        """parse(*args), or None when the entry is refused (counted, logged by key)."""
        try:
            return parse(*args)
        except Refused as e:
            self.refused(key, e.args[0])
            return None

    def reply(self, key, reply, empty):
        """One reply of a pipeline run with raise_on_error=False: a command refused for this key
        (WRONGTYPE: not what a gateway writes there) is one refused entry, read as `empty`."""
        if isinstance(reply, redis.ResponseError):
            self.refused(key, "malformed")
            return empty
        if isinstance(reply, Exception):
            raise reply
        return reply

    def _mac(self, kind, body):
        return hmac.new(self.secret, b"binlink %s\x00%s" % (kind.encode(), body.encode()), hashlib.sha256).hexdigest()

    def seal(self, kind, entry):
        """entry (a dict) as "<HMAC-SHA256> <canonical JSON>" under the site's registry secret."""
        body = json.dumps(entry, sort_keys=True, separators=(",", ":"))
        return "%s %s" % (self._mac(kind, body), body)

    def unseal(self, kind, text):
        """The dict a seal() made, else Refused("forged") (not sealed under this site's secret)."""
        mac, _, body = text.partition(" ")
        if not hmac.compare_digest(mac.encode(), self._mac(kind, body).encode()):
            raise Refused("forged")
        entry = json.loads(body)  # sealed: this site's gateways wrote it
        if not isinstance(entry, dict):
            raise Refused("malformed")
        return entry

    def device(self, dev_id, text):
        """The sealed registry entry stored under dev_id's key, else Refused."""
        device, problems = registry.parse_device(self.unseal("device", text), "redis device")
        if problems or device.device_id != dev_id:  # a sealed entry moved to another device's key
            raise Refused("malformed")
        return device

    def retirement(self, dev_hex, text):
        """(device_id, (bin_id, retired_at)) of a sealed retirement, else Refused."""
        entry = self.unseal("retired", text)
        try:
            dev_id = registry.parse_device_id(dev_hex)
        except ValueError:
            raise Refused("malformed") from None
        if entry.get("device_id") != dev_hex or not all(isinstance(entry.get(k), str) for k in ("bin_id", "retired_at")):
            raise Refused("malformed")
        return dev_id, (entry["bin_id"], entry["retired_at"])
