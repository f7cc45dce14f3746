"""`binlink decode` as a user runs it: the installed console command."""
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import VECTORS

BINLINK = str(Path(sys.executable).with_name("binlink"))
BY_NAME = {v["name"]: v for v in VECTORS}


def run(*args):
    return subprocess.run([BINLINK, *args], capture_output=True, text=True)


def test_decode_prints_one_json_object():
    v = BY_NAME["reading_normal"]
    r = run("decode", "--key", v["key_hex"], v["frame_hex"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == v["decoded"]


def test_decode_rejects_with_reason_and_exit_2():
    v = BY_NAME["bad_tag_wrong_key"]
    r = run("decode", "--key", v["key_hex"], v["frame_hex"])
    assert r.returncode == 2
    assert r.stderr.startswith("rejected: bad_tag")
    assert r.stdout == ""


def test_decode_replay_with_last_fcnt():
    v = BY_NAME["replay_same_counter"]
    r = run("decode", "--key", v["key_hex"], "--last-fcnt", str(v["last_fcnt"]), v["frame_hex"])
    assert (r.returncode, r.stderr.split()[:2]) == (2, ["rejected:", "replay"])


def test_decode_without_key_says_unverified():
    v = BY_NAME["hello_power_on"]
    r = run("decode", v["frame_hex"])
    assert r.returncode == 0
    out = json.loads(r.stdout)
    assert out["verified"] is False and out["fw_version"] == "1.0.0"
    assert "not verified" in r.stderr


def test_decode_truncated_and_not_hex():
    assert run("decode", "--key", "00" * 16, "1100").stderr.startswith("rejected: truncated")
    assert run("decode", "zz").returncode == 2
