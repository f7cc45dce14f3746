"""`binlink registry add|rekey|retire|list|import|export|set|push`: the fleet's bins, by the commands an
operator uses.

The registry file is the gateway's (its config's `gateway.registry`, else registry.default_path()).
Changes keep the file's owner, group and mode (run as root: `sudo binlink registry ...`). With a
[redis] table in the config, a new id is claimed fleet-wide and every change is pushed to the shared
registry, which every gateway polls: no restart needed. Keys are never printed; `--key-out FILE`
writes the bin's entry with its key (a new file, mode 0600, owned by the user who ran sudo) for
`make flash KEY_FILE=FILE`."""
import os
import sys

from binlink.gateway import config as config_mod, homeassistant, integrate, registry, registry_file, registry_merge, registry_settings


def add_parser(sub):
    r = sub.add_parser("registry", help="add, re-key, retire and list bins (device ids are never reused)")
    r.add_argument("--config", default=None, help="gateway config (default: /etc/binlink/gateway.toml when present)")
    r.add_argument("--registry", default=None, help="registry file (default: the config's, else %s)" % registry.DEFAULT_PATH)
    rsub = r.add_subparsers(dest="registry_command", required=True)
    a = rsub.add_parser("add", help="register a new bin (a new random device id); a bin already registered is "
                                    "refused unless --rekey")
    a.add_argument("bin_id")
    a.add_argument("--depth-mm", type=int, required=True, help="sensor to bin floor")
    a.add_argument("--full-mm", type=int, required=True, help="sensor to surface at which the bin is full")
    a.add_argument("--name", default="")
    a.add_argument("--lat", type=float, default=None)
    a.add_argument("--lon", type=float, default=None)
    a.add_argument("--report-s", type=int, default=None, help="the bin's report interval (default 3600)")
    a.add_argument("--rekey", action="store_true", help="the bin is registered already: give it a new key "
                   "(same device id, key epoch + 1) and this calibration")
    a.add_argument("--key-out", default=None, help=KEY_OUT_HELP)
    a.set_defaults(func=cmd_add)
    k = rsub.add_parser("rekey", help="a new key for a bin: same device id, key epoch + 1")
    k.add_argument("bin_id")
    k.add_argument("--key-out", default=None, help=KEY_OUT_HELP)
    k.set_defaults(func=cmd_rekey)
    im = rsub.add_parser("import", help="merge a technician's registry: new bins added, bins known here kept "
                                        "(--update takes the file's), conflicts reported (exit 1)")
    im.add_argument("file")
    im.add_argument("--update", action="store_true", help="bins known here take the file's entry (its key epoch "
                    "must not be older)")
    im.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    im.set_defaults(func=cmd_import)
    ex = rsub.add_parser("export", help="the registry without keys (an inventory); --with-keys -o FILE for "
                                        "another gateway's `registry import`")
    ex.add_argument("-o", "--output", default=None, help="a new file (mode 0600) instead of standard output")
    ex.add_argument("--with-keys", action="store_true", help="include the keys (needs -o)")
    ex.set_defaults(func=cmd_export)
    t = rsub.add_parser("retire", help="remove a bin for good: its id is never reused; its retained state and "
                                       "Home Assistant discovery are cleared")
    t.add_argument("bin_id")
    t.set_defaults(func=cmd_retire)
    li = rsub.add_parser("list", help="every bin and retired id (never keys)")
    li.set_defaults(func=cmd_list)
    st = rsub.add_parser("set", help="desired settings: BIN... KEY=VALUE... or --all KEY=VALUE... (KEY= unsets); "
                                     "sent in each bin's next receive window, refused when the bin would refuse them")
    st.add_argument("words", nargs="+", metavar="BIN|KEY=VALUE", help="bin ids or globs ('market-*'), then settings")
    st.add_argument("--all", action="store_true", help="every bin of the registry")
    st.set_defaults(func=lambda args: registry_settings.cmd_set(args, _context, _publish))
    p = rsub.add_parser("push", help="publish this registry to the shared state (Redis)")
    p.set_defaults(func=cmd_push)
    r.set_defaults(func=lambda args: r.print_help() or 2)


def _context(args):
    """(gateway config or None, registry path, SharedState or None)."""
    cfg_path = args.config or ("/etc/binlink/gateway.toml" if os.path.exists("/etc/binlink/gateway.toml") else None)
    cfg = config_mod.load(cfg_path) if cfg_path else None
    # the one location rule (registry.default_path), the gateway's config naming the gateway's file
    path = args.registry or os.environ.get("BINLINK_REGISTRY") or (cfg.registry if cfg else registry.default_path())
    shared = None
    if cfg is not None and cfg.redis.enabled:
        from binlink.gateway.metrics import Metrics
        from binlink.gateway.shared_state import SharedState

        shared = SharedState(cfg.redis, Metrics())
        if not shared.up:
            raise config_mod.ConfigError(["redis %s: unreachable; a registry change must reach the shared state "
                                          "(try again, or drop --config to edit the file alone)" % cfg.redis.url])
    return cfg, path, shared


KEY_OUT_HELP = ("write the bin's entry with its new key to this new file (mode 0600; under sudo owned by you) "
                "for `make flash BIN=... KEY_FILE=FILE`")


def _open_key_out(path):
    """The --key-out file, created before the registry changes (a key that cannot be written must
    not be registered); None without --key-out."""
    if not path:
        return None
    try:
        return registry_file.create_private(path, registry_file.sudo_owner())
    except FileExistsError:
        raise config_mod.ConfigError(["--key-out %s: the file exists; give a new file (it would hold another "
                                      "key)" % path]) from None
    except OSError as e:
        raise config_mod.ConfigError(["--key-out %s: cannot create it: %s" % (path, e.strerror or e)]) from None


def _with_key_out(args, change):
    """Runs change() (which returns the Device) with the --key-out file open; writes the entry
    there, or removes the empty file when the change failed."""
    f = _open_key_out(args.key_out)
    try:
        device = change()
    except BaseException:
        if f is not None:
            f.close()
            os.unlink(args.key_out)
        raise
    if f is not None:
        with f:
            import tomli_w

            f.write(b"# binlink key file: bin %s, for make flash KEY_FILE=...; delete it after flashing\n" % device.bin_id.encode())
            tomli_w.dump(registry.to_data(registry.Registry({device.device_id: device})), f)
    return device


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
    if known is not None and not args.rekey:
        raise config_mod.ConfigError(["bin %s is already registered (device %s, key epoch %d): nothing changed; give "
                                      "--rekey to give it a new key (its board must then be flashed with it)"
                                      % (args.bin_id, known.dev, known.key_epoch)])
    if known is None and args.rekey:
        raise config_mod.ConfigError(["bin %s is not in registry %s: --rekey is for a bin already registered"
                                      % (args.bin_id, path)])
    device = _with_key_out(args, lambda: registry.provision(
        path, args.bin_id, args.depth_mm, args.full_mm, name=args.name, taken=taken, lat=args.lat, lon=args.lon,
        report_s=args.report_s))
    if shared is not None and known is None and not shared.claim_id(device.device_id):
        registry.retire(path, args.bin_id)  # claimed meanwhile elsewhere: never use it, try again
        if args.key_out:
            os.unlink(args.key_out)
        print("error: device id %s was claimed by another registry meanwhile; run add again" % device.dev, file=sys.stderr)
        return 1
    _publish(shared, path)
    _done(device, "re-keyed" if known else "added", args.key_out)
    return 0


def cmd_rekey(args):
    _, path, shared = _context(args)
    device = _with_key_out(args, lambda: registry.rekey(path, args.bin_id))
    _publish(shared, path)
    _done(device, "re-keyed", args.key_out)
    return 0


def clear_retained(cfg, device, now=None):
    """Queues empty retained payloads for the bin's state and Home Assistant discovery topics for
    the gateway (outbox_spool.py: it holds its state file alone); its publisher sends them like
    any message."""
    from binlink.gateway import outbox_spool

    base = cfg.base_topic
    topics = [integrate.state_topic(base, device.bin_id)]
    topics += homeassistant.discovery_topics(cfg.mqtt.discovery_prefix, base, cfg.site, device)  # either mode
    messages = [("retire:%s:%s" % (device.message_prefix, topic), topic) for topic in topics]

    def queue():
        outbox_spool.put(cfg.state_dir, messages, now)

    owner = _state_owner(cfg.state_dir)
    if owner is None:
        queue()
    else:  # root: the spool file must be the service user's, which takes it in and deletes it
        from binlink.gateway.config_checks import as_user

        as_user(owner, queue)
    return topics


def _state_owner(state_dir):
    """The state dir's owner's name when running as root and it is someone else's, else None."""
    import pwd

    if os.geteuid() != 0:
        return None
    try:
        uid = os.stat(state_dir).st_uid
        return None if uid == 0 else pwd.getpwuid(uid).pw_name
    except (OSError, KeyError):
        return None


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
    print("queued %d empty retained messages (state, Home Assistant discovery) in %s: the gateway publishes them "
          "within a second, or when it starts" % (len(topics), os.path.join(cfg.state_dir, "spool")))
    return 0


def cmd_list(args):
    _, path, _ = _context(args)
    reg = registry.load(path, check_permissions=False, strict=False)
    for problem in reg.rejected:
        print("registry error: %s (the gateway skips this entry)" % problem, file=sys.stderr)
    print("%-8s %-6s %-32s %s" % ("device", "epoch", "bin", "name"))
    for d in sorted(reg.values(), key=lambda d: d.bin_id):
        print("%-8s %-6d %-32s %s" % (d.dev, d.key_epoch, d.bin_id, d.name))
    for dev, (bin_id, at) in sorted(reg.retired.items()):
        print("%-8s %-6s %-32s retired %s" % ("%06x" % dev, "-", bin_id, at))
    return 0


def cmd_import(args):
    _, path, shared = _context(args)
    theirs = registry.load(args.file, strict=False)
    with registry_file.locked(path):
        merged, rep = registry_merge.merge(registry.load_or_empty(path), theirs, update=args.update)
        changed = not args.dry_run and (rep.added or rep.updated or rep.retired)
        if changed:
            registry.save(path, merged)
    for line in rep.lines(args.file):
        print(line)
    for c in rep.conflicts:
        print("conflict: %s" % c, file=sys.stderr)
    if args.dry_run:
        print("dry run: %s not changed" % path)
    elif changed:
        _publish(shared, path)
        print("written: %s; `systemctl reload binlink-gateway` so this gateway uses it" % path)
    return 1 if rep.conflicts else 0


def cmd_export(args):
    import tomli_w

    _, path, _ = _context(args)
    reg = registry.load(path, check_permissions=False)
    data = registry_merge.export_data(reg, with_keys=args.with_keys)
    if args.output is None:
        if args.with_keys:
            print("error: --with-keys writes keys only to a file: give -o FILE (created mode 0600)", file=sys.stderr)
            return 2
        sys.stdout.write(tomli_w.dumps(data))
        return 0
    try:
        f = registry_file.create_private(args.output, registry_file.sudo_owner())
    except FileExistsError:
        print("error: %s exists: give a new file" % args.output, file=sys.stderr)
        return 1
    with f:
        tomli_w.dump(data, f)
    print("exported %d bins%s to %s" % (len(reg), " with their keys" if args.with_keys else " (no keys)", args.output))
    return 0


def cmd_push(args):
    _, path, shared = _context(args)
    if shared is None:
        print("error: the config has no [redis] table: nothing to push to", file=sys.stderr)
        return 2
    _publish(shared, path)
    return 0
