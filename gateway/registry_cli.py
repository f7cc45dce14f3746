"""`binlink registry add|rekey|retire|list|push`: the fleet's bins, by the commands an operator uses.

The registry file is the gateway's (its config's `gateway.registry`, /etc/binlink/devices.toml by
default). With a [redis] table in the config, a new id is claimed fleet-wide and every change is
pushed to the shared registry, which every gateway polls: no restart needed. Keys are never printed;
`--key-out FILE` writes one (mode 0600) for flashing a bin by hand."""
import os
import sys
import time

from binlink.gateway import config as config_mod, homeassistant, integrate, registry


def add_parser(sub):
    r = sub.add_parser("registry", help="add, re-key, retire and list bins (device ids are never reused)")
    r.add_argument("--config", default=None, help="gateway config (default: /etc/binlink/gateway.toml when present)")
    r.add_argument("--registry", default=None, help="registry file (default: the config's, else %s)" % registry.DEFAULT_PATH)
    rsub = r.add_subparsers(dest="registry_command", required=True)
    a = rsub.add_parser("add", help="register a bin: a new random device id, or a new key for a bin already known")
    a.add_argument("bin_id")
    a.add_argument("--depth-mm", type=int, required=True, help="sensor to bin floor")
    a.add_argument("--full-mm", type=int, required=True, help="sensor to surface at which the bin is full")
    a.add_argument("--name", default="")
    a.add_argument("--key-out", default=None, help="write the new key (hex, mode 0600) to this file")
    a.set_defaults(func=cmd_add)
    k = rsub.add_parser("rekey", help="a new key for a bin: same device id, key epoch + 1")
    k.add_argument("bin_id")
    k.add_argument("--key-out", default=None)
    k.set_defaults(func=cmd_rekey)
    t = rsub.add_parser("retire", help="remove a bin for good: its id is never reused; its retained state and "
                                       "Home Assistant discovery are cleared")
    t.add_argument("bin_id")
    t.set_defaults(func=cmd_retire)
    li = rsub.add_parser("list", help="every bin and retired id (never keys)")
    li.set_defaults(func=cmd_list)
    p = rsub.add_parser("push", help="publish this registry to the shared state (Redis)")
    p.set_defaults(func=cmd_push)
    r.set_defaults(func=lambda args: r.print_help() or 2)


def _context(args):
    """(gateway config or None, registry path, SharedState or None)."""
    cfg_path = args.config or ("/etc/binlink/gateway.toml" if os.path.exists("/etc/binlink/gateway.toml") else None)
    cfg = config_mod.load(cfg_path) if cfg_path else None
    path = args.registry or (cfg.registry if cfg else registry.default_path())
    shared = None
    if cfg is not None and cfg.redis.enabled:
        from binlink.gateway.metrics import Metrics
        from binlink.gateway.shared_state import SharedState

        shared = SharedState(cfg.redis, Metrics())
        if not shared.up:
            raise config_mod.ConfigError(["redis %s: unreachable; a registry change must reach the shared state "
                                          "(try again, or drop --config to edit the file alone)" % cfg.redis.url])
    return cfg, path, shared


def _write_key(path, device):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(device.key.hex() + "\n")


def _publish(shared, path):
    """Pushes the registry file to the shared state. A file readable by other users is refused
    (its keys may have leaked: re-key, then chmod 600), as is a damaged one (ConfigError naming
    the entry); entries of the shared state that are not trusted are replaced, and counted here."""
    if shared is not None:
        n = shared.push_registry(registry.load(path))
        print("shared registry: %d entries written" % n)
        refused = _refused(shared.metrics)
        if refused:
            print("warning: %d entries of the shared registry were not trusted (forged or damaged) and were "
                  "skipped or replaced: see binlink_readback_rejected_total{source=\"redis\"}" % refused, file=sys.stderr)


def _refused(metrics):
    return sum(s.value for m in metrics.readback_rejected.collect() for s in m.samples
               if s.name.endswith("_total") and s.labels.get("source") == "redis")


def _done(device, what, key_out):
    print("%s: bin %s is device %s, key epoch %d (key not shown%s)"
          % (what, device.bin_id, device.dev, device.key_epoch, "; written to %s" % key_out if key_out else ""))


def cmd_add(args):
    cfg, path, shared = _context(args)
    taken = set()
    if shared is not None:
        taken = shared.claimed_ids()
    known = registry.load_or_empty(path).by_bin(args.bin_id)
    device = registry.provision(path, args.bin_id, args.depth_mm, args.full_mm, name=args.name, taken=taken)
    if shared is not None and known is None and not shared.claim_id(device.device_id):
        registry.retire(path, args.bin_id)  # claimed meanwhile elsewhere: never use it, try again
        print("error: device id %s was claimed by another registry meanwhile; run add again" % device.dev, file=sys.stderr)
        return 1
    if args.key_out:
        _write_key(args.key_out, device)
    _publish(shared, path)
    _done(device, "re-keyed" if known else "added", args.key_out)
    return 0


def cmd_rekey(args):
    _, path, shared = _context(args)
    device = registry.rekey(path, args.bin_id)
    if args.key_out:
        _write_key(args.key_out, device)
    _publish(shared, path)
    _done(device, "re-keyed", args.key_out)
    return 0


def clear_retained(cfg, device, now=None):
    """Queues empty retained payloads for the bin's state and Home Assistant discovery topics in
    the gateway's durable outbox: its publisher sends them like any message."""
    from binlink.gateway.outbox import Batch, Message, Outbox

    now = time.time() if now is None else now
    base = cfg.base_topic
    topics = [integrate.state_topic(base, device.bin_id)]
    topics += [t for t, _ in homeassistant.messages(cfg.mqtt.discovery_prefix, base, cfg.site, device)]
    batch = Batch()
    for topic in topics:
        batch.states[topic] = Message("retire:%s:%s" % (device.message_prefix, topic), topic, "", True, now)
    box = Outbox(os.path.join(cfg.state_dir, "gateway.sqlite"))
    try:
        box.commit(batch)
    finally:
        box.close()
    return topics


def cmd_retire(args):
    cfg, path, shared = _context(args)
    device = registry.retire(path, args.bin_id)
    _publish(shared, path)
    print("retired: bin %s, device %s: the id is never reused" % (device.bin_id, device.dev))
    if cfg is None:
        print("warning: no gateway config: clear the bin's retained state and discovery topics yourself "
              "(binlink registry --config GATEWAY.toml retire clears them)", file=sys.stderr)
        return 0
    topics = clear_retained(cfg, device)
    print("queued %d empty retained messages (state, Home Assistant discovery) in %s" % (len(topics), cfg.state_dir))
    return 0


def cmd_list(args):
    _, path, _ = _context(args)
    reg = registry.load(path, check_permissions=False)
    print("%-8s %-6s %-32s %s" % ("device", "epoch", "bin", "name"))
    for d in sorted(reg.values(), key=lambda d: d.bin_id):
        print("%-8s %-6d %-32s %s" % (d.dev, d.key_epoch, d.bin_id, d.name))
    for dev, (bin_id, at) in sorted(reg.retired.items()):
        print("%-8s %-6s %-32s retired %s" % ("%06x" % dev, "-", bin_id, at))
    return 0


def cmd_push(args):
    _, path, shared = _context(args)
    if shared is None:
        print("error: the config has no [redis] table: nothing to push to", file=sys.stderr)
        return 2
    _publish(shared, path)
    return 0
