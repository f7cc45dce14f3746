"""State several gateways share through Redis (or Valkey): frame counters, deduplication claims and
the device registry, so a reading heard by several gateways is published once and a frame replayed
to another gateway is refused (docs/gateway.md, Several gateways).

Key names (prefix default "binlink"); a bin's keys carry its id as a hash tag, so in a Redis
Cluster they share one slot and the claim script touches one slot only:

  <prefix>:{<device>}:ctr                hash  epoch, key_id, fcnt: the last counter the fleet accepted
  <prefix>:{<device>}:seen:<epoch>:<fcnt> string digest of the frame, SET NX with a TTL: the claim
  <prefix>:{<device>}:bin                hash  epoch, fcnt, fill, flags of the bin's newest reading: events
                                               (emptied, full) compare with the fleet's last reading
  <prefix>:{<device>}:device             string the registry entry, sealed (below; holds the key: protect
                                               Redis by ACL/TLS)
  <prefix>:devices / :retired / :ids     set / hash / set: registry index, retired ids (sealed), ids ever claimed
  <prefix>:registry:version              integer raised on every registry change: gateways poll it
  <prefix>:reconciled:<gateway>          "1": this gateway pushed its counters since Redis last lost its data

Nothing read from Redis is trusted as it stands (docs/gateway.md §5, threat model): registry entries
are sealed with an HMAC-SHA256 under the site's registry secret (a file every gateway of the site
has, never in Redis), so a Redis writer cannot swap a bin's key or add a bin; every other value is
checked (a 32-bit counter, a bin state, a claim) and one that fails is skipped, counted in
binlink_readback_rejected_total{source="redis"} and logged by its key: it never stops the gateway
or another bin.

When Redis is unreachable the gateway carries on with its local SQLite state (the single-gateway
default), says so in its log and metrics, and pushes every counter it knows when Redis is back
(perhaps empty). Keys, passwords and the secret are never logged."""
import hashlib
import hmac
import json
import logging
import re
import time

import redis

from binlink.gateway import integrate, logs, registry
from binlink.gateway.config import ConfigError
from binlink.gateway.outbox import Batch, Message
from binlink.gateway.registry import Registry
from binlink.wire import codec

log = logs.get("shared")
RETRY_S = 2.0  # how often a gateway working on local state tries Redis again

# Every value the scripts read back from Redis is checked before use: a value that is not a
# 32-bit counter, or a claim that is not "<digest>:p:<gateway>" / "<digest>:c", is not trusted and is
# overwritten; the scripts then say which kind they refused (counted by the gateway).
UINT = """
local function uint(s)
  local n = tonumber(s)
  if n and n >= 0 and n <= 4294967295 and n == math.floor(n) then return n end
end
"""

# A frame's claim, atomically in the bin's slot. ARGV: epoch, key_id, fcnt, digest, ttl, gateway,
# the frame's newest reading (fcnt, fill or '', flags; '' '' '' for a hello), which becomes the
# bin's state if newer, and MAX_FCNT_GAP. The claim returns the state before it, for the events
# (emptied, full). The claim holds "<digest>:p:<gateway>" (pending) until the claimer's outbox
# holds the reading, then "<digest>:c" (confirm). ok: this gateway publishes it; pending /
# duplicate: another gateway claimed these very bytes (pending: not yet on its disk); replay: a
# counter the fleet already accepted; stale_key: a key older than the fleet's.
# A fleet counter more than MAX_FCNT_GAP above a frame this gateway verified against its own
# counter is not trusted (a Redis writer would lock the bin out): the frame's counter replaces it.
# A claim above the fleet's counter was not made by a claim (which raises the counter): not trusted.
CLAIM = UINT + """
local epoch, fcnt, gap = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[10])
local seen = redis.call('GET', KEYS[2])
local d = string.len(ARGV[4])
if seen and string.sub(seen, 1, d + 1) == ARGV[4] .. ':' then
  local mark = string.sub(seen, d + 2)
  if string.sub(mark, 1, 2) == 'p:' then return 'pending' end
  if mark == 'c' then return 'duplicate' end
end
local refused = ''
local cur = redis.call('HMGET', KEYS[1], 'epoch', 'fcnt')
local e, c = uint(cur[1]), uint(cur[2])
if cur[1] and not (e and c) then refused, e = 'counter', nil end
if e and epoch < e then return 'stale_key' end
if e == epoch and c - fcnt > gap then refused, e = 'counter_ahead', nil end
if e == epoch and fcnt <= c then return 'replay' end
if seen and refused == '' then refused = 'claim' end
redis.call('SET', KEYS[2], ARGV[4] .. ':p:' .. ARGV[6], 'EX', ARGV[5])
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'key_id', ARGV[2], 'fcnt', ARGV[3])
local bin = redis.call('HMGET', KEYS[3], 'epoch', 'fcnt', 'fill', 'flags')
local be, bf = uint(bin[1]), uint(bin[2])
if ARGV[7] ~= '' then
  if not (be and bf) or epoch > be or (epoch == be and tonumber(ARGV[7]) > bf) then
    local fill = ARGV[8]
    if fill == '' and be == epoch and tonumber(bin[3]) then fill = bin[3] end
    redis.call('HSET', KEYS[3], 'epoch', ARGV[1], 'fcnt', ARGV[7], 'fill', fill, 'flags', ARGV[9])
  end
end
return {'ok', bin[1], bin[2], bin[3], bin[4], refused}
"""

# A claim still pending after its claimer had time to commit: that gateway died in between
# (SIGKILL, power cut). A peer that heard the same bytes takes the claim over. ARGV: digest, gateway.
TAKEOVER = """
local seen = redis.call('GET', KEYS[1])
if not seen or string.sub(seen, 1, string.len(ARGV[1]) + 2) ~= ARGV[1] .. ':p' then return 0 end
redis.call('SET', KEYS[1], ARGV[1] .. ':p:' .. ARGV[2], 'KEEPTTL')
return 1
"""

# Reconciliation after an outage: a counter only ever moves forward (or to a newer key); a stored
# counter that is not one is replaced.
ADVANCE = UINT + """
local e, c = uint(redis.call('HGET', KEYS[1], 'epoch')), uint(redis.call('HGET', KEYS[1], 'fcnt'))
local epoch, fcnt = tonumber(ARGV[1]), tonumber(ARGV[3])
if e and c and (epoch < e or (epoch == e and fcnt <= c)) then return 0 end
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'key_id', ARGV[2], 'fcnt', ARGV[3])
return 1
"""


def status_batch(cfg, up, now=None):
    """The retained `gateway/<id>/shared_state` message — "shared", or "local" while Redis is away —
    as an outbox batch, so it is published like any message (and after a broker outage too)."""
    now = time.time() if now is None else now
    topic = "%s/gateway/%s/shared_state" % (cfg.base_topic, cfg.gateway_id)
    payload = json.dumps({"gateway": cfg.gateway_id, "state": "shared" if up else "local", "since": integrate.iso(now)},
                         sort_keys=True)
    batch = Batch()
    batch.states[topic] = Message("shared_state:%s:%d:%d" % (cfg.gateway_id, int(now * 1000), up), topic, payload, True, now)
    return batch


def read_secret(key, path):
    """A secret file's content (stripped); ConfigError naming the key when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read().strip()
    except OSError as e:
        raise ConfigError(["%s: cannot read %s: %s" % (key, path, e.strerror or e)]) from None


def connect(rc):
    """A redis client for the [redis] config table (standalone, Sentinel or Cluster)."""
    password = read_secret("redis.password_file", rc.password_file).decode() if rc.password_file else None
    opts = dict(username=rc.username or None, password=password, socket_timeout=rc.timeout_s,
                socket_connect_timeout=rc.timeout_s, decode_responses=True)
    if rc.ca_file or rc.cert_file:
        opts.update(ssl_ca_certs=rc.ca_file or None, ssl_certfile=rc.cert_file or None, ssl_keyfile=rc.key_file or None)
    if rc.sentinels:
        from redis.sentinel import Sentinel

        if rc.ca_file:
            opts["ssl"] = True  # Sentinel hands out plain connections unless told
        hosts = [(h.rpartition(":")[0], int(h.rpartition(":")[2])) for h in rc.sentinels]
        return Sentinel(hosts, sentinel_kwargs={"socket_timeout": rc.timeout_s}, **opts).master_for(rc.sentinel_master)
    if rc.cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(rc.url, **opts)
    return redis.Redis.from_url(rc.url, **opts)


# A reply the client cannot make sense of (a garbled or hostile server) raises ValueError,
# TypeError or UnicodeDecodeError (a ValueError) rather than RedisError: all mean "Redis unavailable".
UNAVAILABLE = (redis.RedisError, OSError, ValueError, TypeError)
UINT32_MAX = 2**32 - 1
_UINT = re.compile(r"[0-9]{1,10}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")


class Refused(Exception):
    """An entry read back from Redis that is not trusted; args: the reason (a metric label)."""


def _uint(text):
    """A 32-bit unsigned counter written by a gateway, else Refused."""
    if isinstance(text, str) and _UINT.fullmatch(text) and int(text) <= UINT32_MAX:
        return int(text)
    raise Refused("malformed")


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
    return _uint(fcnt), fill, flags


class SharedState:
    def __init__(self, rc, metrics, gateway_id="", client=None, clock=time.monotonic):
        self.rc = rc
        self.gateway_id = gateway_id
        self.prefix = rc.prefix
        self.metrics = metrics
        self.clock = clock
        self.secret = read_secret("redis.registry_secret_file", rc.registry_secret_file)  # the same at every gateway of the site
        self.r = client or connect(rc)
        self._claim = self.r.register_script(CLAIM)
        self._advance = self.r.register_script(ADVANCE)
        self._takeover = self.r.register_script(TAKEOVER)
        self.up = False
        self._warned = False  # "unavailable" is logged once per outage
        self._next_try = 0.0
        self._registry_version = None
        self._refusals_logged = logs.RateLimit(per_minute=10)
        # device_id -> (epoch, key_id, fcnt): the newest counter of every bin claimed through this
        # gateway; all are pushed back when Redis returns (perhaps empty, or flushed)
        self.counters = {}
        self.check()

    # keys ----------------------------------------------------------------------------------
    def _k(self, device_id, what):
        return "%s:{%06x}:%s" % (self.prefix, device_id, what)

    def _g(self, what):
        return "%s:%s" % (self.prefix, what)

    # trust ---------------------------------------------------------------------------------
    def refused(self, key, reason):
        """An entry of Redis not used: counted, and logged (rate-limited) by its key, never its value."""
        self.metrics.readback_rejected.labels("redis", reason).inc()
        if self._refusals_logged.allow(reason, self.clock()):
            logs.event(log, logging.WARNING, "shared state entry refused", key=key, reason=reason)

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

    # health --------------------------------------------------------------------------------
    def _down(self, e):
        self.metrics.shared_errors.inc()
        if not self._warned:
            self._warned = True
            logs.event(log, logging.WARNING, "shared state unavailable: working on local state; readings heard by "
                       "several gateways may be published more than once until it is back", error=type(e).__name__,
                       detail=str(e)[:200])
        self.up = False
        self.metrics.shared_up.set(0)
        self._next_try = self.clock() + RETRY_S

    def check(self):
        """True while Redis answers; tries again every RETRY_S after a failure and reconciles."""
        if self.up:
            return True
        if self.clock() < self._next_try:
            return False
        try:
            self.r.ping()
            pushed = self._reconcile()
        except UNAVAILABLE as e:
            self._down(e)
            return False
        self.up, self._warned = True, False
        self.metrics.shared_up.set(1)
        logs.event(log, logging.INFO, "shared state available", counters_reconciled=pushed)
        return True

    def _reconcile(self):
        """Pushes every counter this gateway knows (Redis may be back empty: a counter missing there
        would let an old frame of a quiet bin be accepted again), and marks Redis as reconciled by
        this gateway, so that a flush while it answers is noticed too (registry_changed)."""
        with self.r.pipeline(transaction=False) as p:
            for dev, (epoch, key_id, fcnt) in self.counters.items():
                self._advance(keys=[self._k(dev, "ctr")], args=[epoch, key_id, fcnt], client=p)
            p.set(self._g("reconciled:%s" % self.gateway_id), "1")
            return sum(p.execute()[:-1])

    def remember(self, device, fcnt):
        """A counter this gateway accepted (or saw claimed): pushed again whenever Redis returns."""
        prev = self.counters.get(device.device_id)
        if prev is None or (device.key_epoch, fcnt) > (prev[0], prev[2]):
            self.counters[device.device_id] = (device.key_epoch, device.key_id, fcnt)

    # counters and claims -------------------------------------------------------------------
    def last(self, device):
        """The fleet's last accepted counter for this device under its current key, or None."""
        if not self.check():
            return None
        key = self._k(device.device_id, "ctr")
        try:
            epoch, key_id, fcnt = self.r.hmget(key, "epoch", "key_id", "fcnt")
        except UNAVAILABLE as e:
            self._down(e)
            return None
        if epoch is None and fcnt is None:
            return None
        try:
            epoch, fcnt = _uint(epoch), _uint(fcnt)
            if not (isinstance(key_id, str) and _KEY_ID.fullmatch(key_id)):
                raise Refused("malformed")
        except Refused as e:
            self.refused(key, e.args[0])
            return None
        return fcnt if epoch == device.key_epoch and key_id == device.key_id else None

    def _seen(self, device, fcnt):
        return self._k(device.device_id, "seen:%d:%d" % (device.key_epoch, fcnt))

    def claim(self, device, fcnt, digest, ttl_s, newest=None):
        """(verdict, bin state) — verdict 'ok', 'pending', 'duplicate', 'replay', 'stale_key', or
        'local' when Redis is away (the caller decides on its own state, and the counter is pushed
        on reconciliation); bin state (fcnt, fill, flags) of the fleet's newest reading of this bin
        under this key, with 'ok', else None."""
        return self.claim_many([(device, fcnt, digest, newest)], ttl_s)[0]

    def claim_many(self, frames, ttl_s):
        """claim() for (device, fcnt, digest, newest) each, in one round trip, in order."""
        verdicts = [("local", None)] * len(frames)
        if self.check():
            try:
                with self.r.pipeline(transaction=False) as p:
                    for device, fcnt, digest, newest in frames:
                        self._claim(keys=[self._k(device.device_id, "ctr"), self._seen(device, fcnt), self._k(device.device_id, "bin")],
                                    args=[device.key_epoch, device.key_id, fcnt, digest, int(ttl_s), self.gateway_id]
                                    + (["", "", ""] if newest is None else [newest[0], "" if newest[1] is None else newest[1], newest[2]])
                                    + [codec.MAX_FCNT_GAP], client=p)
                    outs = p.execute()
            except UNAVAILABLE as e:
                self._down(e)
            else:
                verdicts = [self._verdict(device, fcnt, out) for (device, fcnt, *_), out in zip(frames, outs)]
        for device, fcnt, _, _ in frames:  # after the claims: a reconciliation in check() must not pre-empt them
            self.remember(device, fcnt)
        return verdicts

    def _verdict(self, device, fcnt, out):
        if isinstance(out, str):
            return out, None
        epoch, bin_fcnt, fill, flags, refused = out[1:]
        if refused:  # the claim replaced an entry it did not trust
            self.refused(self._seen(device, fcnt) if refused == "claim" else self._k(device.device_id, "ctr"), refused)
        if epoch is None and bin_fcnt is None:
            return "ok", None
        try:
            same_key = _uint(epoch) == device.key_epoch
            state = bin_state(bin_fcnt, fill, flags)
        except Refused as e:
            self.refused(self._k(device.device_id, "bin"), e.args[0])
            return "ok", None
        return "ok", state if same_key else None

    def confirm(self, claims):
        """After the group commit: these claims' readings are on this gateway's disk."""
        if not claims or not self.check():
            return
        try:
            with self.r.pipeline(transaction=False) as p:
                for device, fcnt, digest in claims:
                    p.set(self._seen(device, fcnt), digest + ":c", xx=True, keepttl=True)
                p.execute()
        except UNAVAILABLE as e:
            self._down(e)

    def take_over(self, device, fcnt, digest):
        """True: the claim was still pending (its claimer died) and is now this gateway's."""
        if not self.check():
            return False
        try:
            return bool(self._takeover(keys=[self._seen(device, fcnt)], args=[digest, self.gateway_id]))
        except UNAVAILABLE as e:
            self._down(e)
            return False

    def is_duplicate(self, device, fcnt, digest):
        """These bytes were claimed (accepted) by some gateway of the fleet within the TTL."""
        if not self.check():
            return False
        try:
            return (self.r.get(self._seen(device, fcnt)) or "").startswith(digest + ":")
        except UNAVAILABLE as e:
            self._down(e)
            return False

    # registry ------------------------------------------------------------------------------
    def _device(self, dev_id, text):
        """The sealed registry entry stored under dev_id's key, else Refused."""
        device, problems = registry.parse_device(self.unseal("device", text), "redis device")
        if problems or device.device_id != dev_id:  # a sealed entry moved to another device's key
            raise Refused("malformed")
        return device

    def _retirement(self, dev_hex, text):
        """(device_id, (bin_id, retired_at)) of a sealed retirement, else Refused."""
        entry = self.unseal("retired", text)
        try:
            dev_id = registry.parse_device_id(dev_hex)
        except ValueError:
            raise Refused("malformed") from None
        if entry.get("device_id") != dev_hex or not all(isinstance(entry.get(k), str) for k in ("bin_id", "retired_at")):
            raise Refused("malformed")
        return dev_id, (entry["bin_id"], entry["retired_at"])

    def _trusted(self, key, parse, *args):
        """parse(*args), or None when the entry is refused (counted, logged by key)."""
        try:
            return parse(*args)
        except Refused as e:
            self.refused(key, e.args[0])
            return None

    def _read_registry(self, dev_ids):
        """(the shared retirements, the shared entries of dev_ids: Device or None each), trusted ones
        only. A key of the wrong type (WRONGTYPE) is one refused entry, not an outage."""
        retired_key = self._g("retired")
        with self.r.pipeline(transaction=False) as p:
            p.hgetall(retired_key)
            for dev in dev_ids:
                p.get(self._k(dev, "device"))
            gone, *texts = p.execute(raise_on_error=False)
        retired = {}
        for dev_hex, text in self._reply(retired_key, gone, {}).items():
            found = self._trusted("%s %s" % (retired_key, dev_hex), self._retirement, dev_hex, text)
            if found is not None:
                retired[found[0]] = found[1]
        devices = []
        for dev, text in zip(dev_ids, texts):
            key = self._k(dev, "device")
            text = self._reply(key, text, None)
            devices.append(None if text is None else self._trusted(key, self._device, dev, text))
        return retired, devices

    def _reply(self, key, reply, empty):
        """One reply of a pipeline run with raise_on_error=False: a command refused for this key
        (WRONGTYPE: not what a gateway writes there) is one refused entry, read as `empty`."""
        if isinstance(reply, redis.ResponseError):
            self.refused(key, "malformed")
            return empty
        if isinstance(reply, Exception):
            raise reply
        return reply

    def push_registry(self, reg):
        """Publishes a registry, each entry sealed: a device whose key epoch is not below the shared
        one, and retirements (which win for good). An entry of the shared registry that is not
        trusted is replaced. Two round trips whatever the fleet's size (reads, then writes); the
        registry's keys span slots, so it is not one script. Returns entries written."""
        retired_key, ids = self._g("retired"), self._g("ids")
        devices = list(reg.values())
        shared_retired, current = self._read_registry([d.device_id for d in devices])
        written = 0
        with self.r.pipeline(transaction=False) as p:
            for dev, (bin_id, at) in reg.retired.items():
                if dev not in shared_retired:
                    p.hset(retired_key, "%06x" % dev, self.seal("retired", {"device_id": "%06x" % dev, "bin_id": bin_id,
                                                                           "retired_at": at}))
                    p.srem(self._g("devices"), "%06x" % dev)
                    p.delete(self._k(dev, "device"))
                    p.sadd(ids, "%06x" % dev)
                    written += 1
            for d, cur in zip(devices, current):
                if d.device_id in shared_retired or (cur is not None and cur.key_epoch > d.key_epoch) or cur == d:
                    continue
                p.set(self._k(d.device_id, "device"), self.seal("device", registry.device_entry(d)))
                p.sadd(self._g("devices"), d.dev)
                p.sadd(ids, d.dev)
                written += 1
            if written:
                p.incr(self._g("registry:version"))
            p.execute()
        return written

    def claim_id(self, device_id):
        """Claims a new device id for the whole fleet (False: some registry already has it)."""
        return bool(self.r.sadd(self._g("ids"), "%06x" % device_id))

    def claimed_ids(self):
        """Ids some registry of the fleet holds (a member that is not an id is skipped)."""
        ids = set()
        for member in self.r.smembers(self._g("ids")):
            found = self._trusted("%s %s" % (self._g("ids"), member[:16]), _device_id, member)
            if found is not None:
                ids.add(found)
        return ids

    def load_registry(self):
        members = self.r.smembers(self._g("devices"))
        dev_ids = sorted(d for d in (self._trusted("%s %s" % (self._g("devices"), m[:16]), _device_id, m) for m in members)
                         if d is not None)
        retired, devices = self._read_registry(dev_ids)
        return Registry({d.device_id: d for d in devices if d is not None}, retired)

    def registry_changed(self):
        """True once per change of the shared registry (polled from the main loop). Notices a
        flush too (this gateway's reconciled mark is gone): its counters are pushed again."""
        if not self.check():
            return False
        try:
            v, reconciled = self.r.mget(self._g("registry:version"), self._g("reconciled:%s" % self.gateway_id))
            flushed = reconciled is None
            if flushed:  # the registry is pushed again by the reload this asks for
                logs.event(log, logging.WARNING, "shared state lost its data: counters and registry pushed again",
                           counters_reconciled=self._reconcile())
        except UNAVAILABLE as e:
            self._down(e)
            return False
        changed = flushed or v != self._registry_version
        self._registry_version = v
        return changed

    def merge(self, local):
        """The registry a gateway uses: its file's, updated by the shared one (a newer key epoch,
        a bin registered at another gateway, a retirement). Local only when Redis is away."""
        if not self.check():
            return local
        try:
            self.push_registry(local)
            shared = self.load_registry()
        except UNAVAILABLE as e:
            self._down(e)
            return local
        merged = Registry(local, {**local.retired, **shared.retired})
        for dev, d in shared.items():
            if dev not in merged or merged[dev].key_epoch < d.key_epoch:
                merged[dev] = d
        for dev in merged.retired:
            merged.pop(dev, None)
        return merged


def _device_id(member):
    """A device id as the registry's index sets hold it (6 hex digits), else Refused."""
    try:
        return registry.parse_device_id(member)
    except ValueError:
        raise Refused("malformed") from None
