"""Every parser against arbitrary input: it answers with its own clear error, never a crash."""
from hypothesis import given, strategies as st

from binlink.firmware import config as fw_config, state
from binlink.gateway import config as gw_config, registry

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False),
                    st.text(max_size=40), st.binary(max_size=8).map(lambda b: b.hex()))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=2),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=2)),
                      max_leaves=4)
GW_KEYS = ["gateway", "source", "mqtt", "events", "metrics", "id", "site", "registry", "state_dir", "port", "format",
           "baud", "host", "tls", "full_pct", "listen", "name", "password", "password_file", "cert_file"]


@st.composite
def gateway_configs(draw):
    """Dicts shaped like the TOML file, with wrong types and unknown keys mixed in."""
    def table(keys):
        return draw(st.dictionaries(st.sampled_from(keys), values, max_size=6))

    doc = {}
    if draw(st.booleans()):
        doc["gateway"] = table(["id", "site", "registry", "state_dir", "dedup_window_s", "log_level", "colour"])
    if draw(st.booleans()):
        doc["source"] = draw(st.one_of(
            st.lists(st.dictionaries(st.sampled_from(["port", "format", "baud", "name", "x"]), values, max_size=4), max_size=3),
            values))
    for t in ("mqtt", "events", "metrics"):
        if draw(st.booleans()):
            doc[t] = table(["host", "port", "tls", "username", "password", "password_file", "cert_file", "full_pct",
                            "emptied_drop_pct", "listen", "bogus"])
    if draw(st.booleans()):
        doc[draw(st.sampled_from(GW_KEYS))] = draw(values)
    return doc


@given(gateway_configs())
def test_gateway_config_parser_only_raises_config_error(doc):
    try:
        cfg = gw_config.parse(doc)
    except gw_config.ConfigError as e:
        assert e.problems and all(isinstance(p, str) and ":" in p for p in e.problems)
    else:
        assert cfg.sources and cfg.gateway_id


@given(st.dictionaries(st.sampled_from(["device", "x"]),
                       st.one_of(values, st.lists(st.dictionaries(
                           st.sampled_from(["device_id", "key", "bin_id", "depth_mm", "full_mm", "name", "lat", "k"]),
                           values, max_size=7), max_size=3)), max_size=2))
def test_registry_parser_only_raises_config_error(doc):
    try:
        devices = registry.parse(doc)
    except registry.ConfigError as e:
        assert e.problems
    else:
        for d in devices.values():
            assert len(d.key) == 16 and 0 <= d.full_mm < d.depth_mm


@given(st.dictionaries(st.sampled_from(sorted(fw_config.DEFAULTS) + ["unknown"]), values, max_size=10), st.binary(max_size=20))
def test_firmware_config_parser_never_raises(doc, raw):
    cfg, chash, problems = fw_config.parse(doc, raw)
    assert len(chash) == 4 and isinstance(problems, list)
    assert set(cfg) == set(fw_config.DEFAULTS)
    if fw_config.usable(cfg):
        assert len(cfg["key"]) == 16 and 0 <= cfg["device_id"] <= 0xFFFFFF
    assert 1 <= cfg["pings"] <= 15 and cfg["temp_bits"] in (9, 10, 11, 12)


entries = st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(min_size=6, max_size=6)),
                   max_size=state.BACKLOG_CAP)


@given(st.integers(0, 2**32 - 1), st.integers(0, 65535), st.integers(0, 65535), entries, st.integers(0, 6000),
       st.integers(0, 255))
def test_rtc_state_round_trip_within_2048_bytes(fcnt, errors, dropped, backlog, budget, alarms):
    s = state.State()
    s.fcnt, s.errors, s.dropped, s.budget_ms, s.alarm_flags = fcnt, errors, dropped, budget, alarms
    s.backlog = [list(e) for e in backlog]
    data = s.pack()
    assert len(data) <= 2048
    r = state.unpack(data)
    assert r.restored and (r.fcnt, r.errors, r.dropped, r.budget_ms, r.alarm_flags) == (fcnt, errors, dropped, budget, alarms)
    assert r.backlog == s.backlog


@given(st.one_of(st.binary(max_size=2048), st.binary(max_size=2048).map(lambda b: state.MAGIC + bytes([state.LAYOUT]) + b)))
def test_rtc_garbage_gives_a_fresh_state(data):
    r = state.unpack(data)
    if data[:3] != state.MAGIC + bytes([state.LAYOUT]):
        assert not r.restored  # only memory this firmware's layout wrote is trusted
    if r.restored:
        # nothing invented or dropped: the state read packs back into the very bytes it came from
        assert data.startswith(r.pack())
    else:
        assert r.fcnt == 0 and r.backlog == [] and r.errors == 0


def test_truncated_rtc_backlog_is_not_trusted():
    s = state.State()
    s.fcnt = 77
    s.backlog = [[1, 2, b"abcdef"], [3, 4, b"ghijkl"]]
    assert not state.unpack(s.pack()[:-3]).restored
