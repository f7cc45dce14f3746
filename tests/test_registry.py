"""Bin identity: device ids unique and never reused, kept through re-flash and re-key; the registry
file format (property test of its parser); the `binlink registry` commands."""
import os
import subprocess

import pytest
from hypothesis import given, strategies as st

from binlink.gateway import registry, registry_merge
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


# --- one validator, problems by line and bin (issue 22) ---------------------------------------------

def _entry(**kw):
    return dict({"device_id": "0000a1", "bin_id": "park-1", "key": "00" * 16, "depth_mm": 1200, "full_mm": 200}, **kw)


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-400, 400)),
       st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-400, 400)),
       st.text(max_size=260))
def test_position_and_name_are_accepted_exactly_within_their_bounds(lat, lon, name):
    ok = -90 <= lat <= 90 and -180 <= lon <= 180 and len(name) <= 200 and not any(ord(c) < 32 or ord(c) == 127 for c in name)
    device, problems = registry.parse_device(_entry(lat=lat, lon=lon, name=name), "x")
    assert (device is not None) == ok, problems
    if ok:
        assert (device.lat, device.lon, device.name) == (lat, lon, name)
    else:
        assert all(p.startswith("x") for p in problems) and problems


def test_lat_without_lon_is_refused():
    assert "give both lat and lon" in registry.parse_device(_entry(lat=52.0), "x")[1][0]


@given(st.lists(st.booleans(), min_size=1, max_size=12), st.integers(0, 3))
def test_a_bad_entry_is_named_by_its_line_and_bin_and_costs_only_its_bin(bad, blank):
    """The file as an installer writes it (comments, blank lines); each bad entry's problem names
    the line its [[device]] starts on and its bin; the lenient load keeps every good one."""
    lines, starts = ["# registry"], []
    for i, is_bad in enumerate(bad):
        lines += [""] * blank
        starts.append(len(lines) + 1)
        lines += ["[[device]]", 'device_id = "%06x"' % (i + 1), 'bin_id = "bin-%d"' % i,
                  'key = "%s"' % ("zz" * 16 if is_bad else "%032x" % (i + 1)), "depth_mm = 1200", "full_mm = 200"]
    text = "\n".join(lines) + "\n"
    import tomllib

    reg = registry.parse(tomllib.loads(text), "registry r.toml", text=text, strict=False)
    assert sorted(d.bin_id for d in reg.values()) == sorted("bin-%d" % i for i, b in enumerate(bad) if not b)
    assert reg.rejected == ["registry r.toml line %d, bin bin-%d: device[%d].key: must be 32 hex digits (128 bits)"
                            % (starts[i], i, i) for i, b in enumerate(bad) if b]
    if any(bad):
        with pytest.raises(ConfigError):
            registry.parse(tomllib.loads(text), "registry r.toml", text=text)


def test_an_id_listed_twice_rejects_both_entries_and_keeps_the_rest(tmp_path):
    path = tmp_path / "d.toml"
    reg = registry.Registry({1: registry.Device(1, "a", bytes(16), 1000, 100), 2: registry.Device(2, "b", bytes(16), 1000, 100)})
    registry.write(str(path), registry.to_data(reg))
    path.write_text(path.read_text().replace('bin_id = "b"', 'bin_id = "a"'))
    loaded = registry.load(str(path), strict=False)
    assert not loaded and len(loaded.rejected) == 2 and all("listed twice" in p for p in loaded.rejected)


# --- writing keeps owner, group and mode -----------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file another owner needs root")
def test_root_editing_the_registry_keeps_its_owner_group_and_mode(tmp_path):
    path = str(tmp_path / "devices.toml")
    registry.provision(path, "park-1", 1200, 200)
    os.chown(path, 4321, 4322)
    os.chmod(path, 0o640)
    registry.provision(path, "park-2", 1200, 200)
    registry.retire(path, "park-1")
    st_ = os.stat(path)
    assert (st_.st_uid, st_.st_gid, oct(st_.st_mode & 0o777)) == (4321, 4322, "0o640")
    assert [f for f in os.listdir(tmp_path) if f != "devices.toml"] == []  # no temporary file left


def test_a_new_registry_is_private(tmp_path):
    path = str(tmp_path / "sub" / "devices.toml")
    registry.provision(path, "park-1", 1200, 200)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


# --- merge (registry import) ----------------------------------------------------------------------

def _reg(devs, retired=()):
    return registry.Registry({d: registry.Device(d, b, bytes([k]) * 16, 1000, 100, key_epoch=e) for d, b, k, e in devs},
                             {r: ("gone-%d" % r, "2026-01-01T00:00:00Z") for r in retired})


regs = st.builds(lambda devs, retired: _reg(devs, [r for r in retired if r not in {d[0] for d in devs}]),
                 st.lists(st.tuples(st.integers(1, 12), st.sampled_from(["a", "b", "c", "d", "e"]), st.integers(0, 3),
                                    st.integers(0, 3)), max_size=5, unique_by=(lambda e: e[0], lambda e: e[1])),
                 st.lists(st.integers(1, 12), max_size=3))


@given(regs, regs, st.booleans())
def test_import_never_moves_an_id_reuses_a_retired_one_or_loses_a_bin(ours, theirs, update):
    merged, rep = registry_merge.merge(ours, theirs, update=update)
    registry.parse(registry.to_data(merged))  # a valid registry: no id or bin twice, no retired id active
    for dev, d in ours.items():  # every bin known here stays, under its id; changed only when asked
        assert merged[dev].bin_id == d.bin_id
        if merged[dev] != d:
            assert update and merged[dev] == theirs[dev]
            assert theirs[dev].key_epoch > d.key_epoch or (theirs[dev].key_epoch == d.key_epoch and theirs[dev].key == d.key)
    assert set(ours.retired) <= set(merged.retired)
    for dev, d in theirs.items():
        if dev in merged:
            assert merged[dev].bin_id == d.bin_id or dev in ours
        if dev not in merged and dev not in merged.retired:
            assert rep.conflicts  # not imported: said
    again, rep2 = registry_merge.merge(merged, theirs, update=update)
    assert again == merged and not rep2.added and not rep2.updated  # importing twice changes nothing more


def test_export_has_no_keys_unless_asked(tmp_path):
    path = str(tmp_path / "devices.toml")
    d = registry.provision(path, "park-1", 1200, 200)

    def run(*args):
        return subprocess.run([BINLINK, "registry", "--registry", path, *args], capture_output=True, text=True)

    r = run("export")
    assert r.returncode == 0 and "park-1" in r.stdout and d.key.hex() not in r.stdout and "key =" not in r.stdout
    assert run("export", "--with-keys").returncode == 2  # keys only into a file
    out = tmp_path / "with-keys.toml"
    r = run("export", "--with-keys", "-o", str(out))
    assert r.returncode == 0 and d.key.hex() not in r.stdout and oct(out.stat().st_mode & 0o777) == "0o600"
    assert registry.load(str(out)).by_bin("park-1").key == d.key


def test_import_a_technicians_registry(tmp_path):
    gw, tech = str(tmp_path / "gw.toml"), str(tmp_path / "tech.toml")
    here = registry.provision(gw, "on-gateway", 1200, 200)
    shared = registry.provision(gw, "both", 1200, 200)
    registry.add(tech, shared.device_id, "both", bytes(16), 1200, 200, key_epoch=1)  # the technician re-flashed it
    new = registry.provision(tech, "from-depot", 1100, 150)
    registry.add(tech, here.device_id ^ 0x10, "on-gateway", bytes(16), 1200, 200)  # a second id for the same bin

    def run(*args):
        return subprocess.run([BINLINK, "registry", "--registry", gw, "import", tech, *args], capture_output=True, text=True)

    r = run()
    assert r.returncode == 1 and "1 added" in r.stdout and "kept as it is here" in r.stdout, r.stdout + r.stderr
    assert "conflict: bin on-gateway" in r.stderr and "Traceback" not in r.stderr
    after = registry.load(gw)
    assert after.by_bin("from-depot").key == new.key and after.by_bin("both").key == shared.key  # kept
    assert after.by_bin("on-gateway").device_id == here.device_id
    r = run("--update")
    assert registry.load(gw).by_bin("both").key == bytes(16) and registry.load(gw).by_bin("both").key_epoch == 1


# --- registry add on a bin already registered; --key-out ---------------------------------------------

def test_add_refuses_a_bin_already_registered_unless_rekey(tmp_path):
    path = str(tmp_path / "devices.toml")

    def run(*args):
        return subprocess.run([BINLINK, "registry", "--registry", path, *args], capture_output=True, text=True)

    assert run("add", "park-1", "--depth-mm", "1200", "--full-mm", "200").returncode == 0
    first = registry.load(path).by_bin("park-1")
    r = run("add", "park-1", "--depth-mm", "1300", "--full-mm", "200")
    assert r.returncode == 2 and "already registered" in r.stderr and "--rekey" in r.stderr
    assert registry.load(path).by_bin("park-1") == first  # untouched
    r = run("add", "park-1", "--depth-mm", "1300", "--full-mm", "200", "--rekey")
    again = registry.load(path).by_bin("park-1")
    assert r.returncode == 0 and again.key != first.key and again.key_epoch == 1 and again.depth_mm == 1300


def test_key_out_never_overwrites_and_a_failed_add_leaves_no_key(tmp_path):
    path = str(tmp_path / "devices.toml")
    key_file = tmp_path / "k.toml"
    key_file.write_text("someone else's key\n")

    def run(*args):
        return subprocess.run([BINLINK, "registry", "--registry", path, *args], capture_output=True, text=True)

    r = run("add", "park-1", "--depth-mm", "1200", "--full-mm", "200", "--key-out", str(key_file))
    assert r.returncode == 2 and "exists" in r.stderr and not os.path.exists(path)
    assert key_file.read_text() == "someone else's key\n"
    r = run("add", "park-1", "--depth-mm", "1200", "--full-mm", "20000", "--key-out", str(tmp_path / "new.toml"))
    assert r.returncode == 2 and not (tmp_path / "new.toml").exists()  # refused entry: no key file either
    r = run("add", "park-1", "--depth-mm", "1200", "--full-mm", "200", "--lat", "95", "--lon", "5")
    assert r.returncode == 2 and "lat: 95.0 is out of range (-90..90)" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="sudo's hand-over of the key file needs root")
def test_key_out_under_sudo_belongs_to_the_administrator(tmp_path):
    path = str(tmp_path / "devices.toml")
    out = tmp_path / "ms1.key"
    r = subprocess.run([BINLINK, "registry", "--registry", path, "add", "ms-1", "--depth-mm", "1200", "--full-mm", "250",
                        "--key-out", str(out)], capture_output=True, text=True,
                       env=dict(os.environ, SUDO_UID="4321", SUDO_GID="4322"))
    assert r.returncode == 0, r.stderr
    st_ = out.stat()
    assert (st_.st_uid, st_.st_gid, oct(st_.st_mode & 0o777)) == (4321, 4322, "0o600")
    assert registry.load(str(out)).by_bin("ms-1").key == registry.load(path).by_bin("ms-1").key


def test_ctrl_c_or_a_missing_permission_in_a_registry_command_is_one_line(tmp_path, monkeypatch, capsys):
    from binlink.gateway import cli, registry_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(registry_cli, "cmd_list", interrupted)
    assert cli.main(["registry", "--registry", str(tmp_path / "d.toml"), "list"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "devices.toml"
    registry.provision(str(path), "park-1", 1200, 200)
    folder.chmod(0o500)
    try:
        if os.geteuid() == 0:  # root writes anywhere: tests/test_installed.py runs this as the service user
            return
        r = subprocess.run([BINLINK, "registry", "--registry", str(path), "add", "park-2", "--depth-mm", "1200",
                            "--full-mm", "200"], capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "permission denied" in r.stderr
    finally:
        folder.chmod(0o700)


def _provision_many(path, prefix, n, barrier):
    barrier.wait()
    for i in range(n):
        registry.provision(path, "%s-%d" % (prefix, i), 1200, 200)


def test_bins_registered_at_the_same_time_are_all_kept(tmp_path):
    """Two technicians' `make flash` (or two administrators) writing one registry at once: the file
    is locked while it is read, changed and replaced, so no bin's key is lost."""
    import multiprocessing

    path = str(tmp_path / "devices.toml")
    registry.provision(path, "first", 1200, 200)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_provision_many, args=(path, "w%d" % w, 6, barrier)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(registry.load(path)) == 1 + 4 * 6
