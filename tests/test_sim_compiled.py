"""The simulator's hot modules compiled by Cython (simulator/compiled.py) compute what their source
computes: a seeded district run both ways gives the same frames, byte for byte, and the same figures;
a build of another source is never used."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from binlink.sim import compiled

# A district of each firmware policy, as `binlink sim --report` runs them (small: 6 bins, 2 + 2 days),
# every frame the bins put on air recorded; prints the modules that ran compiled and a digest.
DISTRICT = r"""
import hashlib, json
from binlink.sim import compiled, policy

frames = []
receiver = policy._receiver

def recording(tr, rng, loss, rules):
    receive = receiver(tr, rng, loss, rules)
    def on_air(dev, payload, on_air_len):
        frames.append(bytes(payload).hex())
        return receive(dev, payload, on_air_len)
    return on_air

policy._receiver = recording
results = [policy._district(p, 6, 2, 3, policy.MARGIN_H, 0.03, 6, 2, policy.START, 0.8, range(6)) for p in ("forecast", "reactive")]
print(json.dumps({"compiled": compiled.active(), "frames": len(frames),
                  "digest": hashlib.sha256(json.dumps([frames, results], sort_keys=True, default=repr).encode()).hexdigest()}))
"""


def _run(code, **env):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, **env))
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def _built():
    if compiled.missing():
        pytest.skip("the simulator's part models are not compiled here (make builds them; Cython, a C compiler "
                    "and Python's headers are needed): nothing to compare")


def test_a_compiled_district_puts_the_same_frames_on_air_with_the_same_figures():
    _built()
    fast = json.loads(_run(DISTRICT))
    source = json.loads(_run(DISTRICT, **{compiled.SOURCE_ONLY_ENV: "1"}))
    assert fast["compiled"] == list(compiled.MODULES)
    assert source["compiled"] == []
    assert fast["frames"] > 300  # 6 bins x 4 days of hourly reports, twice
    assert fast == dict(source, compiled=fast["compiled"])


def test_a_build_of_another_source_is_never_loaded(tmp_path):
    """An edited module runs as its source until it is built again: the build of the old source
    lies under the old digest, which the new source never asks for."""
    _built()
    name = "binlink.sim.parts.cell"
    import binlink.sim.parts

    source = compiled._source(name, binlink.sim.parts.__path__)
    current = compiled.build_path(name, source)
    stale = os.path.join(tmp_path, os.path.basename(current).replace(name + "-", name + "-0000"))
    shutil.copyfile(current, stale)
    where = "import binlink.sim.parts.cell as m; print(m.__file__)"
    assert _run(where, BINLINK_SIM_BUILD_DIR=str(tmp_path)) == source
    shutil.copyfile(current, os.path.join(tmp_path, os.path.basename(current)))
    assert _run(where, BINLINK_SIM_BUILD_DIR=str(tmp_path)) == os.path.join(str(tmp_path), os.path.basename(current))


def test_where_builds_cannot_be_kept_the_simulator_says_so_and_runs_as_source(tmp_path):
    env = dict(os.environ, BINLINK_SIM_BUILD_DIR="/dev/null/builds")
    binlink = os.path.join(os.path.dirname(sys.executable), "binlink")
    r = subprocess.run([binlink, "sim", "--compile"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "cannot keep builds in /dev/null/builds (Not a directory); running as source" in r.stdout
    r = subprocess.run([binlink, "sim", "--report", str(tmp_path / "r.html"), "--bins", "2", "--days", "1", "--chart-bins", "1"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sim: part models run as source (0 of %d compiled; `binlink sim --compile` builds them" % len(compiled.MODULES) in r.stdout
    assert (tmp_path / "r.html").stat().st_size > 0


def test_a_changed_declaration_file_names_another_build(tmp_path):
    """board.pxd shapes the compiled Board (its slots) as much as board.py does: a build is named by
    both, so a changed declaration is never served an old build."""
    import binlink.sim.parts

    source = compiled._source("binlink.sim.parts.board", binlink.sim.parts.__path__)
    for f in [source] + compiled._declarations(source):
        shutil.copyfile(f, tmp_path / os.path.basename(f))
    copy = str(tmp_path / "board.py")
    before = compiled.build_path("binlink.sim.parts.board", copy)
    assert before == compiled.build_path("binlink.sim.parts.board", source)  # the same files, the same build
    with open(tmp_path / "board.pxd", "a") as f:
        f.write("\n")
    assert compiled.build_path("binlink.sim.parts.board", copy) != before
