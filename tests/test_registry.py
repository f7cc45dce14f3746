"""Bin identity: device ids unique and never reused, kept through re-flash and re-key; the registry
file format (property test of its parser); the `binlink registry` commands."""
import os
import subprocess

import pytest
from hypothesis import given, strategies as st

from binlink.gateway import registry
from binlink.gateway.config import ConfigError
from tests.harness import BINLINK


def test_ids_are_random_unique_and_never_reused(tmp_path):
    path = str(tmp_path / "devices.toml")
    devices = [registry.provision(path, "bin-%d" % i, 1200, 200) for i in range(50)]
    ids = {d.device_id for d in devices}
    assert len(ids) == 50 and 0 not in ids and 0xFFFFFF not in ids
    assert ids != set(range(1, 51))  # not a workstation-local sequence starting at 000001
    gone = registry.retire(path, "bin-7")
    again = [registry.provision(path, "new-%d" % i, 1200, 200) for i in range(20)]
    assert gone.device_id not in {d.device_id for d in again}
    with pytest.raises(ConfigError, match="never reused"):
        registry.add(path, gone.device_id, "bin-7", bytes(16), 1200, 200)


def test_allocation_skips_every_taken_id():
    seq = iter([4, 4, 9, 2])  # rng(0xFFFFFE) draws; ids are draw + 1
    assert registry.allocate_id({5, 10}, rng=lambda _: next(seq)) == 3


def test_reflash_and_rekey_keep_the_id_and_raise_the_key_epoch(tmp_path):
    path = str(tmp_path / "devices.toml")
    first = registry.provision(path, "park-1", 1200, 200)
    reflashed = registry.provision(path, "park-1", 1200, 200)  # `make flash` on the same bin again
    rekeyed = registry.rekey(path, "park-1")
    assert first.device_id == reflashed.device_id == rekeyed.device_id
    assert (first.key_epoch, reflashed.key_epoch, rekeyed.key_epoch) == (0, 1, 2)
    assert len({first.key, reflashed.key, rekeyed.key}) == 3
    assert first.message_prefix != rekeyed.message_prefix  # message ids never repeat across keys
    same = registry.add(path, first.device_id, "park-1", rekeyed.key, 1300, 200)  # new calibration, same key
    assert same.key_epoch == 2


def test_a_bin_id_never_moves_to_another_device(tmp_path):
    path = str(tmp_path / "devices.toml")
    a = registry.provision(path, "park-1", 1200, 200)
    with pytest.raises(ConfigError, match="re-key"):
        registry.add(path, a.device_id ^ 1, "park-1", bytes(16), 1200, 200)


def test_retired_id_listed_as_device_is_refused_on_load(tmp_path):
    data = {"device": [{"device_id": "0000a1", "bin_id": "a", "key": "00" * 16, "depth_mm": 1000, "full_mm": 100}],
            "retired": [{"device_id": "0000a1", "bin_id": "a", "retired_at": "2026-01-01T00:00:00Z"}]}
    with pytest.raises(ConfigError, match="never reused"):
        registry.parse(data)


entries = st.lists(st.tuples(st.integers(0, 0xFFFFFF), st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True),
                             st.binary(min_size=16, max_size=16), st.integers(0, 5000), st.integers(1, 5000),
                             st.integers(0, 1000)),
                   max_size=8, unique_by=(lambda e: e[0], lambda e: e[1]))


@given(entries, st.lists(st.integers(0, 0xFFFFFF), max_size=4))
def test_registry_round_trips_through_its_file_format(es, gone):
    reg = registry.Registry({dev: registry.Device(dev, b, k, full + span, full, "", None, None, epoch)
                             for dev, b, k, full, span, epoch in es})
    reg.retired = {g: ("old", "2026-01-01T00:00:00Z") for g in gone if g not in reg}
    back = registry.parse(registry.to_data(reg))
    assert back == reg and back.retired == reg.retired


@given(st.dictionaries(st.sampled_from(["device_id", "bin_id", "key", "key_epoch", "depth_mm", "full_mm", "x"]),
                       st.one_of(st.integers(-2, 2**25), st.text(max_size=40), st.booleans(), st.none()), max_size=7))
def test_any_malformed_entry_is_a_config_error_never_a_crash(entry):
    try:
        devices = registry.parse({"device": [entry]})
    except ConfigError as e:
        assert e.problems and all("key:" not in p or "32 hex" in p for p in e.problems)
    else:  # accepted: only a complete, well-formed entry may be, and it comes back as written
        assert set(entry) == {"device_id", "bin_id", "key", "depth_mm", "full_mm"} or \
            set(entry) == {"device_id", "bin_id", "key", "key_epoch", "depth_mm", "full_mm"}, "accepted %r" % entry
        (dev,) = devices.values()
        assert dev.key == bytes.fromhex(entry["key"]) and len(dev.key) == 16, "accepted %r" % entry
        assert dev.bin_id == entry["bin_id"] and 0 <= entry["full_mm"] < entry["depth_mm"], "accepted %r" % entry
        assert (dev.depth_mm, dev.full_mm, dev.key_epoch) == (entry["depth_mm"], entry["full_mm"], entry.get("key_epoch", 0))


def test_registry_commands(tmp_path):
    path = str(tmp_path / "devices.toml")

    def run(*args):
        return subprocess.run([BINLINK, "registry", "--registry", path, *args], capture_output=True, text=True)

    r = run("add", "park-1", "--depth-mm", "1200", "--full-mm", "200", "--key-out", str(tmp_path / "k"))
    assert r.returncode == 0 and "added: bin park-1 is device" in r.stdout
    key = open(tmp_path / "k").read().strip()
    assert oct(os.stat(tmp_path / "k").st_mode & 0o777) == "0o600" and key not in r.stdout + r.stderr
    dev = registry.load(path).by_bin("park-1").dev
    r = run("rekey", "park-1")
    assert r.returncode == 0 and "device %s, key epoch 1" % dev in r.stdout
    r = run("retire", "park-1")
    assert r.returncode == 0 and "never reused" in r.stdout and "clear" in r.stderr
    r = run("list")
    assert dev in r.stdout and "retired" in r.stdout and key not in r.stdout
    r = run("rekey", "park-1")
    assert r.returncode == 2 and "not in registry" in r.stderr


@pytest.mark.parametrize("bin_id", ["evil/#", "a+b", "bin#", "a/b", "bin\x00", "bin\n", "Bin", "-bin", "b" * 65, ""])
def test_a_bin_id_unfit_for_an_mqtt_topic_is_refused(bin_id):
    """The file and the shared state (Redis) hold entries to these same rules (registry.parse_device)."""
    entry = {"device_id": "0000a1", "bin_id": bin_id, "key": "00" * 16, "depth_mm": 1000, "full_mm": 100}
    device, problems = registry.parse_device(entry, "redis device")
    assert device is None and problems == ["redis device.bin_id: %r must be lowercase letters, digits, - or _" % bin_id]
    with pytest.raises(ConfigError):
        registry.parse({"device": [entry]})
    assert registry.parse_device(dict(entry, bin_id="b" * 64), "x")[0].bin_id == "b" * 64
