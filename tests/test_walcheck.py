"""A WAL cut short or damaged loses committed readings without a word from SQLite: the gateway
reads the WAL (and the -shm an older binlink left) before opening the state file and says so
(gateway/walcheck.py)."""
import os
import shutil
import sqlite3
import struct

from hypothesis import given, settings, strategies as st

from binlink.gateway import recovery, storage, walcheck

FRAME = 24 + storage.PAGE_SIZE


def _crashed_state(tmp_path, commits=12):
    """A state file as a crash leaves it: db, -wal and -shm copied while the writer is open, in
    shared locking as binlink before 0.5 wrote it (since, no -shm: storage.CommitMark stands in for
    its index, tests/test_gateway_state.py). Returns (path of the copy, rows committed)."""
    live = str(tmp_path / "live.sqlite")
    db = storage.connect(live, exclusive=False)
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
    for table in ("outbox", "counters", "bins"):  # what recovery.check looks for in a state file
        db.execute("CREATE TABLE %s (x)" % table)
    for i in range(commits):
        storage.write(db, live, lambda d, i=i: d.execute("INSERT INTO t (body) VALUES (?)", (bytes([i]) * 600,)))
    copy = str(tmp_path / "copy.sqlite")
    for suffix in ("", "-wal", "-shm"):
        shutil.copyfile(live + suffix, copy + suffix)
    db.close()
    return copy, commits


def _rows(path):
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT count(*) FROM t").fetchone()[0]
    finally:
        db.close()


def _cut(path, start, end=None):
    with open(path + "-wal", "rb") as f:
        wal = f.read()
    with open(path + "-wal", "wb") as f:
        f.write(wal[:start] + (b"" if end is None else wal[end:]))


def test_an_intact_wal_after_a_crash_is_replayed_whole(tmp_path):
    path, commits = _crashed_state(tmp_path)
    report = walcheck.check(path)
    assert report.damaged is None and report.kept_frames > 0
    assert _rows(path) == commits


def test_a_wal_cut_short_by_one_frame_is_found_with_the_shm(tmp_path):
    path, commits = _crashed_state(tmp_path)
    _cut(path, os.path.getsize(path + "-wal") - FRAME)
    report = walcheck.check(path)
    assert report.damaged and report.lost_frames >= 1
    assert _rows(path) < commits  # what SQLite does without a word: the reading is gone


def test_a_piece_cut_out_of_the_middle_is_found_even_without_the_shm(tmp_path):
    path, commits = _crashed_state(tmp_path)
    os.unlink(path + "-shm")
    middle = 32 + 5 * FRAME + 100
    _cut(path, middle, middle + 700)
    report = walcheck.check(path)
    assert report.damaged and report.lost_frames >= 2
    assert _rows(path) < commits


def test_a_torn_last_transaction_is_a_crash_not_a_loss(tmp_path):
    """A power cut while a commit is written leaves part of its frames: nothing committed is lost."""
    path, _ = _crashed_state(tmp_path)
    with open(path + "-wal", "rb") as f:
        wal = f.read()
    salts = wal[16:24]
    torn = struct.pack(">2I", 7, 0) + salts + b"\x00" * 8 + b"\x55" * 300  # no commit flag, cut mid-page
    with open(path + "-wal", "ab") as f:
        f.write(torn)
    assert walcheck.check(path).damaged is None


def test_recovery_says_the_loss_keeps_a_copy_and_takes_counters_from_the_broker(tmp_path):
    path, _ = _crashed_state(tmp_path)
    _cut(path, os.path.getsize(path + "-wal") - 2 * FRAME)
    report = recovery.Report()
    assert recovery.find_problems(path, report) is None  # the file stays: SQLite replays what is whole
    assert report.problems == ["wal_damaged"] and report.needs_counters
    copies = [f for f in os.listdir(tmp_path) if f.startswith("copy.sqlite.wal-damaged-")]
    assert len(copies) == 1


def test_no_wal_and_an_empty_wal_lose_nothing(tmp_path):
    path = str(tmp_path / "none.sqlite")
    assert walcheck.check(path).damaged is None
    open(path + "-wal", "wb").close()
    assert walcheck.check(path).damaged is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.binary(max_size=200))
def test_any_bytes_as_wal_and_shm_are_read_without_raising(wal, shm):
    report = walcheck.read(wal, shm)
    assert report.lost_frames >= 0 and report.kept_frames >= 0


_REAL = {}


def _real_wal(tmp_path_factory):
    if not _REAL:
        path, _ = _crashed_state(tmp_path_factory.mktemp("wal"))
        with open(path + "-wal", "rb") as f:
            _REAL["wal"] = f.read()
        with open(path + "-shm", "rb") as f:
            _REAL["shm"] = f.read(96)
    return _REAL["wal"], _REAL["shm"]


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(min_value=1, max_value=12 * FRAME), flip=st.integers(min_value=0), with_shm=st.booleans())
def test_a_real_wal_cut_or_flipped_anywhere_is_read_and_a_committed_loss_is_found_with_the_shm(
        tmp_path_factory, cut, flip, with_shm):
    wal, shm = _real_wal(tmp_path_factory)
    shm = shm if with_shm else b""
    intact = walcheck.read(wal, shm)
    short = walcheck.read(wal[:max(0, len(wal) - cut)], shm)
    assert short.kept_frames <= intact.kept_frames
    if with_shm and short.kept_frames < intact.kept_frames:
        assert short.damaged  # a committed frame gone and the index remembers it
    at = flip % len(wal)
    flipped = walcheck.read(wal[:at] + bytes([wal[at] ^ 0xFF]) + wal[at + 1:], shm)
    assert flipped.kept_frames <= intact.kept_frames
