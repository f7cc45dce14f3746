"""A bin's desired settings: the `settings` table of its [[device]] entry, `binlink registry set`.

    [[device]]
    bin_id = "market-1"
    ...
    settings = { report_s = 1800, fire_c = 60 }

Only the settings a downlink can change (binlink.wire.downlink.SETTINGS) and only values the bin
itself would take (downlink.setting_problems, the very code the bin runs): the gateway refuses
what the bin would. What the bin should run is the firmware's defaults with the table over them
(desired()); its hash is what a bin of firmware 1.4.0 or later reports in its hello when it runs
exactly that. The table travels with the entry everywhere the entry goes: the file, `registry
import/export`, the shared registry (Redis)."""
import fnmatch

from binlink.wire import downlink

# the firmware's defaults for the eight settings (firmware/binlink/firmware/config.py DEFAULTS; a
# test holds the two together): a bin flashed by `make flash` runs these until told otherwise
FIRMWARE_DEFAULTS = {"wake_s": 900, "report_s": 3600, "report_near_full_s": 900, "near_full_pct": 75,
                     "change_mm": 100, "fire_c": 70, "low_battery_mv": 3300, "backlog_per_frame": 4}


def problems(d, p):
    """Problems of an entry's `settings` table (d: the entry as a dict), each naming p."""
    table = d.get("settings")
    if table is None:
        return []
    if not isinstance(table, dict):
        return ["%s.settings: must be a table (settings = { report_s = 1800 })" % p]
    return ["%s.settings.%s" % (p, x) for x in downlink.setting_problems(table)] + \
        ["%s.settings: %s" % (p, x) for x in combined_problems(table) if x not in downlink.setting_problems(table)]


def combined_problems(table):
    """What the bin would refuse in the full set it would run: the table over the defaults
    (report_s shorter than the default wake_s, say, when only report_s is given)."""
    return downlink.setting_problems(desired_from(table))


def parse(table):
    """The entry's table as the Device keeps it: sorted (name, value) pairs (hashable)."""
    return tuple(sorted(table.items())) if table else ()


def desired_from(table):
    full = dict(FIRMWARE_DEFAULTS)
    full.update(table or {})
    return full


def desired(device):
    """{name: value} of all eight settings the bin should run."""
    return desired_from(dict(device.settings))


def desired_hash(device):
    return downlink.settings_hash(desired(device)).hex()


class KnownSets:
    """Full sets of settings by their hash: the firmware's defaults and every set wanted of a bin
    since the start (at most LIMIT, the oldest forgotten first). A bin that reports one of these
    hashes runs exactly that set, so a change to it needs only the settings that differ."""

    LIMIT = 1000

    def __init__(self):
        self.sets = {}
        self.add(FIRMWARE_DEFAULTS)

    def add(self, full):
        h = downlink.settings_hash(full).hex()
        self.sets.pop(h, None)
        self.sets[h] = dict(full)
        while len(self.sets) > self.LIMIT:
            self.sets.pop(next(iter(self.sets)))

    def get(self, hash_hex):
        return self.sets.get(hash_hex)


def parse_assignments(texts):
    """KEY=VALUE words of the command line as {name: int}; KEY= (nothing after =) unsets KEY, which
    comes back as None. Raises ValueError with one line naming the word."""
    out = {}
    for text in texts:
        name, eq, value = text.partition("=")
        name = name.strip()
        if not eq or not name:
            raise ValueError("%r: expected KEY=VALUE (settings: %s)" % (text, ", ".join(downlink.SETTING_IDS)))
        if name not in downlink.SETTING_IDS:
            raise ValueError("%s: not a setting a downlink can change (settings: %s)" % (name, ", ".join(downlink.SETTING_IDS)))
        if name in out:
            raise ValueError("%s: given twice" % name)
        value = value.strip()
        if value == "":
            out[name] = None
            continue
        if not (value.isascii() and value.isdigit()):
            raise ValueError("%s=%s: the value must be a whole number" % (name, value))
        out[name] = int(value)
    return out


def select(reg, patterns, every=False):
    """The devices named by bin ids or shell-style globs ("market-*"), or every device; a pattern
    matching no bin raises ValueError naming it."""
    if every:
        return sorted(reg.values(), key=lambda d: d.bin_id)
    chosen = {}
    for pat in patterns:
        found = [d for d in reg.values() if fnmatch.fnmatchcase(d.bin_id, pat)]
        if not found:
            raise ValueError("%s: no bin in the registry matches" % pat)
        chosen.update((d.device_id, d) for d in found)
    return sorted(chosen.values(), key=lambda d: d.bin_id)


def apply(device, changes):
    """The Device with its table changed (None unsets a setting), or ValueError: what the bin would
    refuse, as one line."""
    import dataclasses

    table = dict(device.settings)
    for name, value in changes.items():
        if value is None:
            table.pop(name, None)
        else:
            table[name] = value
    found = downlink.setting_problems(table) or combined_problems(table)
    if found:
        raise ValueError("bin %s: %s (the bin would refuse it; nothing changed)" % (device.bin_id, found[0]))
    return dataclasses.replace(device, settings=parse(table))


def set_settings(path, patterns, words, every=False):
    """`binlink registry set`: changes the desired settings of the bins named (or every bin) in
    the registry file at path, under its lock; all of them or none. Returns the changed Devices.
    Raises ConfigError with one line: a word that is not KEY=VALUE, a value the bin would refuse."""
    from binlink.gateway import registry, registry_file
    from binlink.gateway.config import ConfigError

    try:
        changes = parse_assignments(words)
        if not changes:
            raise ValueError("give at least one KEY=VALUE (settings: %s)" % ", ".join(downlink.SETTING_IDS))
        if every == bool(patterns):
            raise ValueError("name the bins (ids or globs such as 'market-*') or give --all, not both")
        with registry_file.locked(path):
            reg = registry.load(path, check_permissions=False)
            changed = [apply(d, changes) for d in select(reg, patterns, every)]
            for d in changed:
                reg[d.device_id] = d
            registry.save(path, reg)
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    return changed


def cmd_set(args, context, publish):
    """The command: context(args) -> (cfg, path, shared); publish(shared, path) pushes the file."""
    _, path, shared = context(args)
    words = [w for w in args.words if "=" in w]
    bins = [w for w in args.words if "=" not in w]
    changed = set_settings(path, bins, words, every=args.all)
    publish(shared, path)
    for d in changed:
        print("bin %s: desired %s (hash %s)" % (d.bin_id, " ".join("%s=%d" % kv for kv in d.settings) or "firmware defaults",
                                              desired_hash(d)))
    print("%d bins changed in %s; each gets its settings in its next receive window (`systemctl reload "
          "binlink-gateway` so this gateway uses them)" % (len(changed), path))
    return 0
