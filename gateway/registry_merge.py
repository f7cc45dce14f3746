"""`binlink registry import` and `export`: bins move between a technician's registry and a
gateway's without overwriting either.

merge(ours, theirs): a bin new to ours is added; a bin both know under the same device id is
kept as ours (unless update: then theirs when its key epoch is newer, or the same with the same key); anything that would
move an id between bins, reuse a retired id or take a bin id another device holds is a conflict,
reported and never imported. Ids retired there are retired here too (never reused)."""
from binlink.gateway import registry


class Report:
    def __init__(self):
        self.added, self.unchanged, self.kept, self.updated, self.retired, self.conflicts = [], [], [], [], [], []

    def lines(self, source):
        out = ["import from %s: %d added, %d updated, %d unchanged, %d kept as they are here, %d retired ids taken over, "
               "%d conflicts" % (source, len(self.added), len(self.updated), len(self.unchanged), len(self.kept),
                                 len(self.retired), len(self.conflicts))]
        out += ["added: bin %s (device %s, key epoch %d)" % (d.bin_id, d.dev, d.key_epoch) for d in self.added]
        out += ["updated: bin %s (device %s, key epoch %d)" % (d.bin_id, d.dev, d.key_epoch) for d in self.updated]
        out += ["kept: %s" % k for k in self.kept]
        return out


def merge(ours, theirs, update=False):
    """(merged Registry, Report). Neither argument is changed."""
    out = registry.Registry(ours, ours.retired)
    rep = Report()
    rep.conflicts += ["%s: not imported" % p for p in theirs.rejected]
    for d in sorted(theirs.values(), key=lambda d: d.bin_id):
        here = out.by_bin(d.bin_id)
        same_id = out.get(d.device_id)
        if d.device_id in out.retired:
            rep.conflicts.append("bin %s: device %s is retired here (bin %s): ids are never reused"
                                 % (d.bin_id, d.dev, out.retired[d.device_id][0]))
        elif here is not None and here.device_id != d.device_id:
            rep.conflicts.append("bin %s: device %s here, device %s in the file: the bin was registered twice; keep "
                                 "one (flash the bin with the key of the one kept) and retire the other"
                                 % (d.bin_id, here.dev, d.dev))
        elif here is None and same_id is not None:
            rep.conflicts.append("device %s: bin %s here, bin %s in the file: ids never move between bins"
                                 % (d.dev, same_id.bin_id, d.bin_id))
        elif here is None:
            out[d.device_id] = d
            rep.added.append(d)
        elif registry.device_entry(here) == registry.device_entry(d):
            rep.unchanged.append(d)
        elif not update:
            rep.kept.append("bin %s differs (key epoch %d here, %d in the file): kept as it is here; --update takes "
                            "the file's" % (d.bin_id, here.key_epoch, d.key_epoch))
        elif d.key != here.key and d.key_epoch <= here.key_epoch:  # which key the board holds cannot be told
            rep.conflicts.append("bin %s: the file has another key at key epoch %d, this registry %d: not taken (a new "
                                 "key always raises the epoch; re-flash the bin if unsure)" % (d.bin_id, d.key_epoch,
                                                                                              here.key_epoch))
        elif d.key_epoch < here.key_epoch:
            rep.conflicts.append("bin %s: the file's key epoch %d is older than this registry's %d: not taken"
                                 % (d.bin_id, d.key_epoch, here.key_epoch))
        else:
            out[d.device_id] = d
            rep.updated.append(d)
    for dev, (bin_id, at) in sorted(theirs.retired.items()):
        if dev in out:
            rep.conflicts.append("device %06x: retired in the file (bin %s), active here as bin %s: retire it here "
                                 "(binlink registry retire %s) if the bin is gone" % (dev, bin_id, out[dev].bin_id,
                                                                                       out[dev].bin_id))
        elif dev not in out.retired:
            out.retired[dev] = (bin_id, at)
            rep.retired.append(dev)
    return out, rep


def export_data(reg, with_keys=False):
    """The registry as its TOML document; without keys unless asked (an inventory for planners)."""
    data = registry.to_data(reg)
    if not with_keys:
        for entry in data["device"]:
            del entry["key"]
    return data
