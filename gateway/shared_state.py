"""State several gateways share through Redis (or Valkey): frame counters, deduplication claims and
the device registry, so a reading heard by several gateways is published once and a frame replayed
to another gateway is refused (docs/gateway.md, Several gateways).

Key names (prefix default "binlink"); a bin's keys carry its id as a hash tag, so in a Redis
Cluster they share one slot and the claim script touches one slot only:

  <prefix>:{<device>}:ctr                hash  epoch, key_id, fcnt: the last counter the fleet accepted
  <prefix>:{<device>}:seen:<epoch>:<fcnt> string digest of the frame, SET NX with a TTL: the claim
  <prefix>:{<device>}:bin                hash  epoch, fcnt, fill, flags of the bin's newest reading: events
                                               (emptied, full) compare with the fleet's last reading
  <prefix>:{<device>}:device             hash  the registry entry (holds the key: protect Redis by ACL/TLS)
  <prefix>:devices / :retired / :ids     set / hash / set: registry index, retired ids, ids ever claimed
  <prefix>:registry:version              integer raised on every registry change: gateways poll it

When Redis is unreachable the gateway carries on with its local SQLite state (the single-gateway
default), says so in its log and metrics, and pushes the counters it advanced meanwhile when Redis
is back. Keys and passwords are never logged."""
import json
import logging
import time

import redis

from binlink.gateway import integrate, logs
from binlink.gateway.outbox import Batch, Message
from binlink.gateway.registry import Device, Registry

log = logs.get("shared")
RETRY_S = 2.0  # how often a gateway working on local state tries Redis again

# A frame's claim, atomically in the bin's slot. ARGV: epoch, key_id, fcnt, digest, ttl, gateway,
# and the frame's newest reading (fcnt, fill or '', flags; '' '' '' for a hello), which becomes the
# bin's state if newer: the claim returns the state before it, for the events (emptied, full).
# The claim holds "<digest>:p:<gateway>" (pending) until the claimer's outbox holds the reading,
# then "<digest>:c" (confirm). ok: this gateway publishes it; pending / duplicate: another gateway
# claimed these very bytes (pending: not yet on its disk); replay: a counter the fleet already
# accepted; stale_key: a key older than the fleet's.
CLAIM = """
local seen = redis.call('GET', KEYS[2])
if seen then
  if string.sub(seen, 1, string.len(ARGV[4])) == ARGV[4] then
    if string.sub(seen, string.len(ARGV[4]) + 2, string.len(ARGV[4]) + 2) == 'p' then return 'pending' end
    return 'duplicate'
  end
  return 'replay'
end
local cur = redis.call('HMGET', KEYS[1], 'epoch', 'fcnt')
local epoch, fcnt = tonumber(ARGV[1]), tonumber(ARGV[3])
if cur[1] then
  local e = tonumber(cur[1])
  if epoch < e then return 'stale_key' end
  if epoch == e and fcnt <= tonumber(cur[2]) then return 'replay' end
end
redis.call('SET', KEYS[2], ARGV[4] .. ':p:' .. ARGV[6], 'NX', 'EX', ARGV[5])
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'key_id', ARGV[2], 'fcnt', ARGV[3])
local bin = redis.call('HMGET', KEYS[3], 'epoch', 'fcnt', 'fill', 'flags')
if ARGV[7] ~= '' then
  local newer = not bin[1] or epoch > tonumber(bin[1]) or (epoch == tonumber(bin[1]) and tonumber(ARGV[7]) > tonumber(bin[2]))
  if newer then
    local fill = ARGV[8]
    if fill == '' and bin[1] and epoch == tonumber(bin[1]) then fill = bin[3] or '' end
    redis.call('HSET', KEYS[3], 'epoch', ARGV[1], 'fcnt', ARGV[7], 'fill', fill, 'flags', ARGV[9])
  end
end
return {'ok', bin[1], bin[2], bin[3], bin[4]}
"""

# A claim still pending after its claimer had time to commit: that gateway died in between
# (SIGKILL, power cut). A peer that heard the same bytes takes the claim over. ARGV: digest, gateway.
TAKEOVER = """
local seen = redis.call('GET', KEYS[1])
if not seen or string.sub(seen, 1, string.len(ARGV[1]) + 2) ~= ARGV[1] .. ':p' then return 0 end
redis.call('SET', KEYS[1], ARGV[1] .. ':p:' .. ARGV[2], 'KEEPTTL')
return 1
"""

# Reconciliation after an outage: a counter only ever moves forward (or to a newer key).
ADVANCE = """
local cur = redis.call('HMGET', KEYS[1], 'epoch', 'fcnt')
local epoch, fcnt = tonumber(ARGV[1]), tonumber(ARGV[3])
if cur[1] then
  local e = tonumber(cur[1])
  if epoch < e or (epoch == e and fcnt <= tonumber(cur[2])) then return 0 end
end
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


def connect(rc):
    """A redis client for the [redis] config table (standalone, Sentinel or Cluster)."""
    password = None
    if rc.password_file:
        with open(rc.password_file) as f:
            password = f.read().strip()
    opts = dict(username=rc.username or None, password=password, socket_timeout=rc.timeout_s,
                socket_connect_timeout=rc.timeout_s, decode_responses=True)
    if rc.ca_file or rc.cert_file:
        opts.update(ssl_ca_certs=rc.ca_file or None, ssl_certfile=rc.cert_file or None, ssl_keyfile=rc.key_file or None)
    if rc.sentinels:
        from redis.sentinel import Sentinel

        hosts = [(h.rpartition(":")[0], int(h.rpartition(":")[2])) for h in rc.sentinels]
        return Sentinel(hosts, sentinel_kwargs={"socket_timeout": rc.timeout_s}, **opts).master_for(rc.sentinel_master)
    if rc.cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(rc.url, **opts)
    return redis.Redis.from_url(rc.url, **opts)


class SharedState:
    def __init__(self, rc, metrics, gateway_id="", client=None, clock=time.monotonic):
        self.rc = rc
        self.gateway_id = gateway_id
        self.prefix = rc.prefix
        self.metrics = metrics
        self.clock = clock
        self.r = client or connect(rc)
        self._claim = self.r.register_script(CLAIM)
        self._advance = self.r.register_script(ADVANCE)
        self._takeover = self.r.register_script(TAKEOVER)
        self.up = False
        self._warned = False  # "unavailable" is logged once per outage
        self._next_try = 0.0
        self._registry_version = None
        self.dirty = {}  # device_id -> (epoch, key_id, fcnt) accepted while Redis was away
        self.check()

    # keys ----------------------------------------------------------------------------------
    def _k(self, device_id, what):
        return "%s:{%06x}:%s" % (self.prefix, device_id, what)

    def _g(self, what):
        return "%s:%s" % (self.prefix, what)

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
        except redis.RedisError as e:
            self._down(e)
            return False
        self.up, self._warned = True, False
        self.metrics.shared_up.set(1)
        logs.event(log, logging.INFO, "shared state available", counters_reconciled=pushed)
        return True

    def _reconcile(self):
        pushed = 0
        for dev, (epoch, key_id, fcnt) in list(self.dirty.items()):
            pushed += self._advance(keys=[self._k(dev, "ctr")], args=[epoch, key_id, fcnt])
            del self.dirty[dev]
        return pushed

    # counters and claims -------------------------------------------------------------------
    def last(self, device):
        """The fleet's last accepted counter for this device under its current key, or None."""
        if not self.check():
            return None
        try:
            epoch, key_id, fcnt = self.r.hmget(self._k(device.device_id, "ctr"), "epoch", "key_id", "fcnt")
        except redis.RedisError as e:
            self._down(e)
            return None
        if fcnt is None or int(epoch) != device.key_epoch or key_id != device.key_id:
            return None
        return int(fcnt)

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
        if self.check():
            try:
                with self.r.pipeline(transaction=False) as p:
                    for device, fcnt, digest, newest in frames:
                        self._claim(keys=[self._k(device.device_id, "ctr"), self._seen(device, fcnt), self._k(device.device_id, "bin")],
                                    args=[device.key_epoch, device.key_id, fcnt, digest, int(ttl_s), self.gateway_id]
                                    + (["", "", ""] if newest is None else [newest[0], "" if newest[1] is None else newest[1], newest[2]]),
                                    client=p)
                    return [self._verdict(device, out) for (device, *_), out in zip(frames, p.execute())]
            except redis.RedisError as e:
                self._down(e)
        for device, fcnt, _, _ in frames:
            prev = self.dirty.get(device.device_id)
            if prev is None or (device.key_epoch, fcnt) > (prev[0], prev[2]):
                self.dirty[device.device_id] = (device.key_epoch, device.key_id, fcnt)
        return [("local", None)] * len(frames)

    @staticmethod
    def _verdict(device, out):
        if isinstance(out, str):
            return out, None
        epoch, bin_fcnt, fill, flags = out[1:]
        if epoch is None or int(epoch) != device.key_epoch:
            return "ok", None
        return "ok", (int(bin_fcnt), float(fill) if fill else None, int(flags))

    def confirm(self, claims):
        """After the group commit: these claims' readings are on this gateway's disk."""
        if not claims or not self.check():
            return
        try:
            with self.r.pipeline(transaction=False) as p:
                for device, fcnt, digest in claims:
                    p.set(self._seen(device, fcnt), digest + ":c", xx=True, keepttl=True)
                p.execute()
        except redis.RedisError as e:
            self._down(e)

    def take_over(self, device, fcnt, digest):
        """True: the claim was still pending (its claimer died) and is now this gateway's."""
        if not self.check():
            return False
        try:
            return bool(self._takeover(keys=[self._seen(device, fcnt)], args=[digest, self.gateway_id]))
        except redis.RedisError as e:
            self._down(e)
            return False

    def is_duplicate(self, device, fcnt, digest):
        """These bytes were claimed (accepted) by some gateway of the fleet within the TTL."""
        if not self.check():
            return False
        try:
            return (self.r.get(self._seen(device, fcnt)) or "").startswith(digest + ":")
        except redis.RedisError as e:
            self._down(e)
            return False

    # registry ------------------------------------------------------------------------------
    def push_registry(self, reg):
        """Publishes a registry: a device whose key epoch is not below the shared one, and
        retirements (which win for good). Two round trips whatever the fleet's size (reads, then
        writes); the registry's keys span slots, so it is not one script. Returns entries written."""
        retired, ids = self._g("retired"), self._g("ids")
        devices = list(reg.values())
        with self.r.pipeline(transaction=False) as p:
            p.hgetall(retired)
            for d in devices:
                p.hgetall(self._k(d.device_id, "device"))
            shared_retired, *current = p.execute()
        written = 0
        with self.r.pipeline(transaction=False) as p:
            for dev, (bin_id, at) in reg.retired.items():
                if "%06x" % dev not in shared_retired:
                    p.hsetnx(retired, "%06x" % dev, "%s %s" % (bin_id, at))
                    p.srem(self._g("devices"), "%06x" % dev)
                    p.delete(self._k(dev, "device"))
                    p.sadd(ids, "%06x" % dev)
                    written += 1
            for d, cur in zip(devices, current):
                if d.dev in shared_retired or (cur and int(cur["key_epoch"]) > d.key_epoch):
                    continue
                fields = {"bin_id": d.bin_id, "key": d.key.hex(), "key_epoch": d.key_epoch, "depth_mm": d.depth_mm,
                          "full_mm": d.full_mm, "name": d.name}
                if d.lat is not None:
                    fields.update(lat=d.lat, lon=d.lon)
                if cur == {k: str(v) for k, v in fields.items()}:
                    continue
                p.hset(self._k(d.device_id, "device"), mapping=fields)
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
        return {int(x, 16) for x in self.r.smembers(self._g("ids"))}

    def load_registry(self):
        dev_hexes = sorted(self.r.smembers(self._g("devices")))
        with self.r.pipeline(transaction=False) as p:
            for dev_hex in dev_hexes:
                p.hgetall(self._k(int(dev_hex, 16), "device"))
            p.hgetall(self._g("retired"))
            *entries, gone = p.execute()
        devices = {}
        for dev_hex, h in zip(dev_hexes, entries):
            if not h:
                continue
            dev = int(dev_hex, 16)
            devices[dev] = Device(dev, h["bin_id"], bytes.fromhex(h["key"]), int(h["depth_mm"]), int(h["full_mm"]),
                                  h.get("name", ""), float(h["lat"]) if "lat" in h else None,
                                  float(h["lon"]) if "lon" in h else None, int(h["key_epoch"]))
        retired = {int(k, 16): tuple(v.split(" ", 1) + [""])[:2] for k, v in gone.items()}
        return Registry(devices, retired)

    def registry_changed(self):
        """True once per change of the shared registry (polled from the main loop)."""
        if not self.check():
            return False
        try:
            v = self.r.get(self._g("registry:version")) or "0"
        except redis.RedisError as e:
            self._down(e)
            return False
        changed = v != self._registry_version
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
        except redis.RedisError as e:
            self._down(e)
            return local
        merged = Registry(local, {**local.retired, **shared.retired})
        for dev, d in shared.items():
            if dev not in merged or merged[dev].key_epoch < d.key_epoch:
                merged[dev] = d
        for dev in merged.retired:
            merged.pop(dev, None)
        return merged
