"""What Home Assistant discovery to publish, and when (the payloads are homeassistant.py).

`Discovery` remembers, in state_dir/discovery.json, a digest per device (bin or gateway) of what
its configs were made from — the bin's registry fields, firmware version, the mode, and a digest
of the templates themselves — and the topics they went to. A start compares digests, not
payloads: with 10,000 bins and nothing changed it renders nothing and publishes nothing. A changed
bin costs one message in "device" mode. A bin gone from the registry gets its topics cleared.

Changing mode (or upgrading from the per-entity record of 0.4) moves each device the way Home
Assistant documents: `{"migrate_discovery": true}` on the old topics (the entities and their
history are kept), the new config, then the old topics cleared. The configs of binlink before
site + bin ids (keyed on the radio id) are cleared only where the broker still retains them:
the publisher subscribes to their topics until a round has been acknowledged after it
(`legacy_checked` in the record, once).

`Announcer` hands the publisher's in-flight window what it has room for, rendering as it goes
(a device's messages are made when taken, never all at once), and records a device once the
broker acknowledged the message that completes it."""
import hashlib
import json
import os
import re
from collections import deque

from binlink.gateway import homeassistant as ha

VERSION = 2
MIGRATE = json.dumps({"migrate_discovery": True})
_LEGACY_NODE = re.compile(r"binlink_([0-9a-f]{6})_(fill|problem)$")
_LEGACY = [("sensor", e) for e in ("fill", "temperature", "battery", "rssi")] + [("binary_sensor", "problem")]


def _schema():
    """A digest of the templates: a release that changes a payload re-announces every device once."""
    sample = ha.BinInfo(1, "b", "n", 1.0, 2.0, 60)
    gw = ha.GatewayInfo("g", "s", "b/s", True, 60.0)
    text = repr([ha.bin_messages("p", "b", "s", sample, m, "1", "v") + ha.gateway_messages("p", gw, m) for m in ("device", "entity")])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


SCHEMA = _schema()


def legacy_subscriptions(prefix):
    """The topics that find what binlink before site + bin ids left retained."""
    return ["%s/sensor/+/fill/config" % prefix, "%s/binary_sensor/+/problem/config" % prefix]


class Discovery:
    def __init__(self, path, prefix, base, site, mode="device", gateway=None):
        self.path, self.prefix, self.base, self.site, self.mode = path, prefix, base, site, mode
        self.gateway = gateway  # homeassistant.GatewayInfo, or None: no gateway device
        self.via = ha.gateway_node(gateway.site, gateway.gateway_id) if gateway else None
        self.nodes = {}  # node -> [digest or None, mode, [topics]]
        self.legacy_checked = False
        try:
            with open(path) as f:
                data = json.load(f)
        except (FileNotFoundError, ValueError):
            data = {}
        if data.get("version") == VERSION:
            self.nodes = {n: list(v) for n, v in data.get("nodes", {}).items()}
            self.legacy_checked = bool(data.get("legacy_checked"))
        elif data:  # 0.4's record, topic -> digest, all per entity: each device is moved once
            self.legacy_checked = True  # 0.4 cleared the old scheme at its first run
            for topic in data:
                parts = topic.split("/")
                if len(parts) >= 4:
                    self.nodes.setdefault(parts[-3], [None, "entity", []])[2].append(topic)

    def _digest(self, *what):
        return hashlib.sha1(repr((SCHEMA, self.mode, self.prefix, self.base, self.site, self.via) + what).encode()).hexdigest()[:20]

    def changes(self, bins, firmware=None, force=False, only=None):
        """Jobs, in order: (node, digest, make) for each device to (re)announce, make() giving its
        (topic, payload) list; (node, None, None) for a device to clear. Nothing is rendered here.
        only: device hex ids to look at (a hello's new firmware), not the whole fleet."""
        firmware = firmware or {}
        jobs = []
        wanted = set()
        if only is not None:
            for device in bins.values():
                sw = firmware.get(device.dev)
                if device.dev in only and self._stale(ha.uid_prefix(self.site, device.bin_id), self._bin_digest(device, sw)):
                    jobs.append(self._bin_job(device, sw))
            return jobs
        if self.gateway is not None:
            node = ha.gateway_node(self.gateway.site, self.gateway.gateway_id)
            wanted.add(node)
            digest = self._digest(tuple(self.gateway))
            if force or self._stale(node, digest):
                jobs.append((node, digest, lambda gw=self.gateway: ha.gateway_messages(self.prefix, gw, self.mode)))
        for device in bins.values():
            node = ha.uid_prefix(self.site, device.bin_id)
            wanted.add(node)
            sw = firmware.get(device.dev)
            if force or self._stale(node, self._bin_digest(device, sw)):
                jobs.append(self._bin_job(device, sw))
        jobs += [(node, None, None) for node in self.nodes if node not in wanted]
        return jobs

    def _bin_digest(self, device, sw):
        return self._digest((device.device_id, device.bin_id, device.name, device.lat, device.lon, device.report_s), sw)

    def _bin_job(self, device, sw):
        return (ha.uid_prefix(self.site, device.bin_id), self._bin_digest(device, sw),
                lambda: ha.bin_messages(self.prefix, self.base, self.site, device, self.mode, sw, self.via))

    def _stale(self, node, digest):
        rec = self.nodes.get(node)
        return rec is None or rec[0] != digest or rec[1] != self.mode

    def expand(self, job):
        """A job's messages: [(topic, payload, record)], record (node, value) on the message that
        completes the device (value None: forgotten), None on the others."""
        node, digest, make = job
        old = self.nodes.get(node)
        old_topics = old[2] if old else []
        if make is None:
            msgs = [(t, "", None) for t in old_topics]
            return msgs[:-1] + [(msgs[-1][0], "", (node, None))] if msgs else []
        new = make()
        topics = [t for t, _ in new]
        moved = [t for t in old_topics if t not in topics]
        out = []
        if moved and old[1] != self.mode:  # the other mode's configs: Home Assistant keeps the entities
            out += [(t, MIGRATE, None) for t in moved]
        out += [(t, p, None) for t, p in new]
        out += [(t, "", None) for t in moved]
        last = out[-1]
        out[-1] = (last[0], last[1], (node, [digest, self.mode, topics]))
        return out

    def legacy_clears(self, topic, payload):
        """A retained config binlink before site + bin ids left (read back from the broker): the
        (topic, "") clears of that radio id's old configs; [] for anything else."""
        node = topic.split("/")[-3] if topic.count("/") >= 3 else ""
        m = _LEGACY_NODE.match(node)
        if not payload or m is None or node in self.nodes or node.startswith(ha.uid_prefix(self.site, "")):
            return []  # (a site named like a radio id with a bin "fill": its own config, never cleared)
        return ["%s/%s/binlink_%s_%s/%s/config" % (self.prefix, c, m.group(1), e, e) for c, e in _LEGACY]

    def mark(self, records, legacy_checked=False):
        """Records acknowledged devices ((node, value) pairs) and saves the record atomically."""
        for node, value in records:
            if value is None:
                self.nodes.pop(node, None)
            else:
                self.nodes[node] = value
        self.legacy_checked = self.legacy_checked or legacy_checked
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"version": VERSION, "legacy_checked": self.legacy_checked, "nodes": self.nodes}, f,
                          separators=(",", ":"))
            os.replace(tmp, self.path)
        except OSError:  # a full disk: after a restart discovery is sent again, which is harmless
            if os.path.exists(tmp):
                os.unlink(tmp)


class Announcer:
    """Discovery on its way to the broker: jobs queued (a device each, unrendered), messages
    rendered as the publisher's in-flight window has room, devices recorded once acknowledged
    (one write per round), messages queued again when a session ends before their acknowledgement."""

    def __init__(self, discovery):
        self.discovery = discovery
        self.jobs = {}  # node -> job, in order; a newer job for a node replaces the older one
        self.ready = deque()  # (topic, payload, record) rendered, to hand out first
        self.in_flight = 0
        self.acked = []  # records acknowledged, not yet written
        self.legacy_listening = False  # subscribed this session to the old scheme's topics
        self.legacy_round = False  # a round acknowledged since: everything retained there has arrived

    def __bool__(self):
        return bool(self.jobs or self.ready)

    def queue_changes(self, bins, firmware, force=False, only=None):
        jobs = self.discovery.changes(bins, firmware, force=force, only=only)
        for job in jobs:
            self.jobs.pop(job[0], None)
            self.jobs[job[0]] = job
        return jobs

    def listen(self, prefix):
        """Topics to subscribe to as a session starts: the old scheme's, until it was checked once."""
        if self.discovery.legacy_checked:
            return []
        self.legacy_listening = True
        return legacy_subscriptions(prefix)

    def retained(self, topic, payload):
        """A message on a subscribed topic: old-scheme configs found are cleared."""
        for t in self.discovery.legacy_clears(topic, payload):
            self.ready.append((t, "", None))

    def take(self, n, held_back=()):
        """Up to n (topic, payload, record) to publish now; those on held_back topics (the broker
        denies them) are dropped: not recorded, they are among the changes again next time."""
        out = []
        while len(out) < n:
            if not self.ready:
                if not self.jobs:
                    break
                node = next(iter(self.jobs))
                self.ready.extend(self.discovery.expand(self.jobs.pop(node)))
                continue
            item = self.ready.popleft()
            if item[0] not in held_back:
                out.append(item)
        self.in_flight += len(out)
        return out

    def acknowledged(self, item):
        if item[2] is not None:
            self.acked.append(item[2])
        self.in_flight -= 1

    def session_lost(self, unacknowledged):
        self.ready.extendleft(reversed(list(unacknowledged)))
        self.in_flight = 0
        self.legacy_listening = False
        self.record()

    def record(self, final=False):
        """Writes what was acknowledged once nothing of the round is left to send or to hear back
        about (final: the process is ending); returns the records written."""
        done = not (self or self.in_flight)
        if done and self.legacy_listening:
            self.legacy_round = True
        if (self.acked or self.legacy_round and not self.discovery.legacy_checked) and (final or done):
            self.discovery.mark(self.acked, legacy_checked=self.legacy_round)
            recorded, self.acked = self.acked, []
            return recorded
        return []
