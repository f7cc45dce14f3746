"""State several gateways share through Redis (or Valkey): frame counters, deduplication claims and
the device registry, so a reading heard by several gateways is published once and a frame replayed
to another gateway is refused (docs/gateway.md, Several gateways).

The key layout and the Lua scripts are in shared_scripts.py; nothing read back from Redis is
trusted as it stands: registry entries are sealed, every other value is checked (shared_trust.py).

When Redis is unreachable the gateway carries on with its local SQLite state (the single-gateway
default), says so in its log and metrics, and pushes every counter it knows when Redis is back
(perhaps empty). Keys, passwords and the secret are never logged."""
import json
import logging
import time

import redis

from binlink.gateway import integrate, logs, registry
from binlink.gateway.config import ConfigError
from binlink.gateway.outbox import Batch, Message
from binlink.gateway.registry import Registry
from binlink.gateway.shared_scripts import ADVANCE, CLAIM, TAKEOVER, Keys
from binlink.gateway.shared_trust import Refused, Trust, bin_state, fleet_counter, index_device_id, uint32
from binlink.wire import codec

log = logs.get("shared")
RETRY_S = 2.0  # how often a gateway working on local state tries Redis again


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


class SharedState:
    """One gateway's client of the shared state: the connection and its outages, claims, counters
    (reconciled after an outage) and the shared registry."""

    def __init__(self, rc, metrics, gateway_id="", client=None, clock=time.monotonic):
        self.rc = rc
        self.gateway_id = gateway_id
        self.keys = Keys(rc.prefix)
        self.metrics = metrics
        self.clock = clock
        self.trust = Trust(read_secret("redis.registry_secret_file", rc.registry_secret_file), metrics, clock)
        self.seal = self.trust.seal  # a registry entry as this site's gateways write it
        self.r = client or connect(rc)
        self._claim = self.r.register_script(CLAIM)
        self._advance = self.r.register_script(ADVANCE)
        self._takeover = self.r.register_script(TAKEOVER)
        self.up = False
        self._warned = False  # "unavailable" is logged once per outage
        self._next_try = 0.0
        self._registry_version = None
        # device_id -> (epoch, key_id, fcnt): the newest counter of every bin claimed through this
        # gateway; all are pushed back when Redis returns (perhaps empty, or flushed)
        self.counters = {}
        self.check()

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
                self._advance(keys=[self.keys.bin(dev, "ctr")], args=[epoch, key_id, fcnt], client=p)
            p.set(self.keys.fleet("reconciled:%s" % self.gateway_id), "1")
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
        key = self.keys.bin(device.device_id, "ctr")
        try:
            epoch, key_id, fcnt = self.r.hmget(key, "epoch", "key_id", "fcnt")
        except UNAVAILABLE as e:
            self._down(e)
            return None
        if epoch is None and fcnt is None:
            return None
        counter = self.trust.trusted(key, fleet_counter, epoch, key_id, fcnt)
        if counter is None:
            return None
        epoch, key_id, fcnt = counter
        return fcnt if epoch == device.key_epoch and key_id == device.key_id else None

    def _seen(self, device, fcnt):
        return self.keys.bin(device.device_id, "seen:%d:%d" % (device.key_epoch, fcnt))

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
                        self._claim(keys=[self.keys.bin(device.device_id, "ctr"), self._seen(device, fcnt), self.keys.bin(device.device_id, "bin")],
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
            self.trust.refused(self._seen(device, fcnt) if refused == "claim" else self.keys.bin(device.device_id, "ctr"), refused)
        if epoch is None and bin_fcnt is None:
            return "ok", None
        try:
            same_key = uint32(epoch) == device.key_epoch
            state = bin_state(bin_fcnt, fill, flags)
        except Refused as e:
            self.trust.refused(self.keys.bin(device.device_id, "bin"), e.args[0])
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
    def _read_registry(self, dev_ids):
        """(the shared retirements, the shared entries of dev_ids: Device or None each), trusted ones
        only. A key of the wrong type (WRONGTYPE) is one refused entry, not an outage."""
        retired_key = self.keys.fleet("retired")
        with self.r.pipeline(transaction=False) as p:
            p.hgetall(retired_key)
            for dev in dev_ids:
                p.get(self.keys.bin(dev, "device"))
            gone, *texts = p.execute(raise_on_error=False)
        retired = {}
        for dev_hex, text in self.trust.reply(retired_key, gone, {}).items():
            found = self.trust.trusted("%s %s" % (retired_key, dev_hex), self.trust.retirement, dev_hex, text)
            if found is not None:
                retired[found[0]] = found[1]
        devices = []
        for dev, text in zip(dev_ids, texts):
            key = self.keys.bin(dev, "device")
            text = self.trust.reply(key, text, None)
            devices.append(None if text is None else self.trust.trusted(key, self.trust.device, dev, text))
        return retired, devices

    def push_registry(self, reg):
        """Publishes a registry, each entry sealed: a device whose key epoch is not below the shared
        one, and retirements (which win for good). An entry of the shared registry that is not
        trusted is replaced. Two round trips whatever the fleet's size (reads, then writes); the
        registry's keys span slots, so it is not one script. Returns entries written."""
        retired_key, ids = self.keys.fleet("retired"), self.keys.fleet("ids")
        devices = list(reg.values())
        shared_retired, current = self._read_registry([d.device_id for d in devices])
        written = 0
        with self.r.pipeline(transaction=False) as p:
            for dev, (bin_id, at) in reg.retired.items():
                if dev not in shared_retired:
                    p.hset(retired_key, "%06x" % dev, self.seal("retired", {"device_id": "%06x" % dev, "bin_id": bin_id,
                                                                           "retired_at": at}))
                    p.srem(self.keys.fleet("devices"), "%06x" % dev)
                    p.delete(self.keys.bin(dev, "device"))
                    p.sadd(ids, "%06x" % dev)
                    written += 1
            for d, cur in zip(devices, current):
                if d.device_id in shared_retired or (cur is not None and cur.key_epoch > d.key_epoch) or cur == d:
                    continue
                p.set(self.keys.bin(d.device_id, "device"), self.seal("device", registry.device_entry(d)))
                p.sadd(self.keys.fleet("devices"), d.dev)
                p.sadd(ids, d.dev)
                written += 1
            if written:
                p.incr(self.keys.fleet("registry:version"))
            p.execute()
        return written

    def claim_id(self, device_id):
        """Claims a new device id for the whole fleet (False: some registry already has it)."""
        return bool(self.r.sadd(self.keys.fleet("ids"), "%06x" % device_id))

    def claimed_ids(self):
        """Ids some registry of the fleet holds (a member that is not an id is skipped)."""
        ids = set()
        for member in self.r.smembers(self.keys.fleet("ids")):
            found = self.trust.trusted("%s %s" % (self.keys.fleet("ids"), member[:16]), index_device_id, member)
            if found is not None:
                ids.add(found)
        return ids

    def load_registry(self):
        members = self.r.smembers(self.keys.fleet("devices"))
        dev_ids = sorted(d for d in (self.trust.trusted("%s %s" % (self.keys.fleet("devices"), m[:16]), index_device_id, m) for m in members)
                         if d is not None)
        retired, devices = self._read_registry(dev_ids)
        return Registry({d.device_id: d for d in devices if d is not None}, retired)

    def registry_changed(self):
        """True once per change of the shared registry (polled from the main loop). Notices a
        flush too (this gateway's reconciled mark is gone): its counters are pushed again."""
        if not self.check():
            return False
        try:
            v, reconciled = self.r.mget(self.keys.fleet("registry:version"), self.keys.fleet("reconciled:%s" % self.gateway_id))
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

