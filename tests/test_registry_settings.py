"""Desired settings in the registry file: kept through a re-key, carried by export/import and the
shared registry's entry, a damaged table costs its bin only (named by line)."""
from binlink.gateway import registry, registry_merge, registry_settings
from tests.harness import KEY

DEV = 0xA1


def test_settings_survive_a_rekey_and_travel_with_the_entry(tmp_path):
    path = str(tmp_path / "devices.toml")
    registry.add(path, DEV, "bin-a", KEY, 1200, 200)
    registry_settings.set_settings(path, ["bin-a"], ["report_s=1800"])
    before = registry.load(path).by_bin("bin-a")
    after = registry.rekey(path, "bin-a")
    assert after.key_epoch == before.key_epoch + 1 and after.settings == (("report_s", 1800),)
    entry = registry.device_entry(after)  # what export, import and Redis (sealed) carry
    assert entry["settings"] == {"report_s": 1800}
    assert registry.parse_device(entry, "x")[0] == after
    theirs = registry.parse({"device": [dict(entry, settings={"report_s": 7200})]})
    merged, rep = registry_merge.merge(registry.load(path), theirs, update=True)
    assert dict(merged[DEV].settings) == {"report_s": 7200} and rep.updated


def test_a_table_the_bin_would_refuse_costs_its_bin_only(tmp_path):
    path = tmp_path / "devices.toml"
    good = registry.device_entry(registry.Device(DEV, "bin-a", KEY, 1200, 200))
    bad = dict(registry.device_entry(registry.Device(0xB2, "bin-b", KEY, 1200, 200)), settings={"fire_c": 5})
    import tomli_w

    path.write_text(tomli_w.dumps({"device": [good, bad]}))
    path.chmod(0o600)
    reg = registry.load(str(path), strict=False)
    assert list(reg) == [DEV]
    assert any("bin bin-b" in p and "settings.fire_c: 5 outside 40..100" in p for p in reg.rejected), reg.rejected
