"""State recovery at start, before any frame is accepted: the start-up sequence and the check of
the state file; salvage.py reads a damaged file, retained.py judges the broker's retained states.

1. The state file is checked: missing (though a marker says this gateway had state), empty,
   unreadable, or failing SQLite's quick_check; its WAL gone while its open mark is still there
   (a clean close removes both, a crash leaves both: storage.mark_open). Each problem
   is logged loudly and counted; a WAL cut short or damaged (walcheck.py: committed frames SQLite
   would drop without a word) too (binlink_state_problems_total{problem=...}); nothing here raises on
   a damaged file, so a bad disk never becomes a crash loop.
2. A damaged file is moved aside (gateway.sqlite.damaged-<time>, with its -wal) for inspection,
   and whatever SQLite can still read from it — counters, bin states, outbox rows pending or not —
   is carried over into a fresh file (salvage.py). A damaged b-tree is read around: ranges of rows
   that fail are halved until only the unreadable rows are left out.
3. The broker's retained bin states are read (a short-lived MQTT session) and each is validated
   as strictly as a frame (retained.parse_state): a refused one is counted and logged, never
   used. Only when step 1 found the state lost, or there was none (a first start), is a bin's
   counter raised to the `fcnt` of its valid state of the device's current key epoch, so a recorded
   frame is not accepted again; with its own state intact the gateway trusts nothing the broker
   says about counters. Valid synced states give the clock check its evidence of the time at every start.

What cannot come back: readings accepted but not yet published when their rows were lost, and
counter values newer than the broker's retained state (a frame accepted while the broker was
unreachable). Both are logged with what is known of them."""
import json
import logging
import os
import shutil
import sqlite3
import time
from datetime import datetime

from binlink.gateway import logs, walcheck
from binlink.gateway.outbox import Outbox
from binlink.gateway.retained import counters_from_states, newest_synced_time, retained_states, valid_states
from binlink.gateway.salvage import carry_over, salvage
from binlink.gateway.storage import StorageFull, is_full

log = logs.get("recovery")
KEEP_DAMAGED = 2  # damaged copies kept aside; older ones go, so a bad disk cannot fill up with them
BROKER_WAIT_S = 3.0  # asking the broker for retained states, state intact
BROKER_WAIT_AFTER_LOSS_S = 30.0  # the same after a state loss: counters matter more than a quick start
FULL_RETRY_S = 5.0


class Report:
    """What start-up found and did; problems are short codes, also the metric's label."""

    def __init__(self):
        self.problems = []
        self.salvaged = {}  # table -> rows carried over
        self.unreadable_rows = 0  # outbox rows (by id gap) that could not be read back
        self.highest_row_id = 0  # the newest outbox row carried over from a damaged file
        self.rebuilt = {}  # counters, bins -> how many were rebuilt from salvaged outbox rows
        self.newest_synced_time = None  # newest received_at of a synced retained state (clock check)
        self.first_start = False  # no state file and no marker: a new gateway, or a new SD card

    @property
    def lost(self):
        return bool(self.problems)

    @property
    def needs_counters(self):
        """Counters come from the broker only when this gateway's own are lost or were never here."""
        return self.lost or self.first_start


def marker_path(db_path):
    return db_path + ".marker"


def _read_marker(db_path):
    try:
        with open(marker_path(db_path)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_marker(db_path):
    """Says this gateway has had state here; small, atomic, fsynced. A full disk is no reason to stop."""
    if _read_marker(db_path) is not None:
        return
    tmp = marker_path(db_path) + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump({"created": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker_path(db_path))
    except OSError as e:
        logs.event(log, logging.WARNING, "state marker not written", path=marker_path(db_path), error=e)


def check(db_path):
    """None when the file opens and passes quick_check (or cannot be checked for want of room:
    a full disk is no damage), else what is wrong with it."""
    try:
        db = sqlite3.connect(db_path, timeout=30)
    except sqlite3.Error as e:
        return str(e)
    try:
        try:
            rows = db.execute("PRAGMA quick_check").fetchall()
        except sqlite3.OperationalError as e:
            if is_full(e, db_path):
                return None
            raise
        if rows != [("ok",)]:
            return "; ".join(r[0] for r in rows[:3])
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = {"outbox", "counters", "bins"} - tables
        if missing:
            return "tables missing: %s" % ", ".join(sorted(missing))
        return None
    except sqlite3.Error as e:
        return str(e)
    finally:
        db.close()


def find_problems(db_path, report):
    """Step 1: finds problems; moves a damaged file aside. Returns the damaged copy's path or None."""
    marker = _read_marker(db_path)
    if not os.path.exists(db_path):
        if marker is not None:
            _problem(report, "state_file_missing", "the state file is gone: pending readings are lost and "
                     "counters come from the broker's retained states", path=db_path)
        else:
            report.first_start = True
        if os.path.exists(db_path + "-wal"):  # a WAL without its file must not be replayed into a new one
            _move_aside(db_path)
        return None
    if os.path.getsize(db_path) == 0:
        _problem(report, "state_file_empty", "the state file is empty", path=db_path)
        return _move_aside(db_path)
    # a clean close removes the WAL and the open mark (before 0.5: the -shm); a crash leaves both:
    # either alone means the WAL was lost
    held = os.path.exists(db_path + ".open") or os.path.exists(db_path + "-shm")
    if held and not os.path.exists(db_path + "-wal"):
        _problem(report, "wal_missing", "the state file's WAL is gone after an unclean stop: the newest "
                 "readings and counters in it are lost", path=db_path + "-wal")
    wal = walcheck.check(db_path)  # before anything opens the file: SQLite rebuilds the -shm on open
    if wal.damaged:
        _problem(report, "wal_damaged", "the state file's WAL is cut short or damaged: the commits in its lost "
                 "frames (readings, counter moves) are gone", path=db_path + "-wal", detail=wal.damaged,
                 frames_kept=wal.kept_frames, frames_lost=wal.lost_frames, copy=_copy_wal_aside(db_path))
    problem = check(db_path)
    if problem is not None:
        _problem(report, "state_file_damaged", "the state file is damaged", path=db_path, detail=problem[:300])
        return _move_aside(db_path)
    return None


def _problem(report, code, message, **fields):
    report.problems.append(code)
    logs.event(log, logging.ERROR, "STATE PROBLEM: " + message, problem=code, **fields)


def _move_aside(db_path):
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    aside = "%s.damaged-%s" % (db_path, stamp)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db_path + suffix):
            os.replace(db_path + suffix, aside + suffix)
    logs.event(log, logging.ERROR, "damaged state file kept aside for inspection", copy=aside)
    _forget_old_copies(db_path)
    return aside


def _copy_wal_aside(db_path):
    """A copy of a damaged WAL for inspection; the file itself stays, SQLite replays what it can."""
    copy = "%s.wal-damaged-%s" % (db_path, datetime.now().strftime("%Y%m%dT%H%M%S"))
    try:
        shutil.copyfile(db_path + "-wal", copy)
    except OSError as e:
        logs.event(log, logging.WARNING, "damaged WAL not copied aside", error=e)
        return None
    _forget_old_copies(db_path, ".wal-damaged-")
    return copy


def _forget_old_copies(db_path, kind=".damaged-"):
    folder, name = os.path.split(os.path.abspath(db_path))
    copies = sorted(f for f in os.listdir(folder) if f.startswith(name + kind) and not f.endswith(("-wal", "-shm")))
    for old in copies[:-KEEP_DAMAGED]:
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(os.path.join(folder, old + suffix))
            except FileNotFoundError:
                pass


# step 3: the broker's retained states ---------------------------------------------------------
def use_retained_states(cfg, box, devices, report, metrics):
    """Reads the broker's retained states: clock evidence at every start; counters only when this
    gateway's own are lost or were never here (report.needs_counters)."""
    wait = BROKER_WAIT_AFTER_LOSS_S if report.lost else BROKER_WAIT_S  # a first start does not wait long for a broker
    states = retained_states(cfg, wait)
    if states is None:
        level = logging.ERROR if report.lost else logging.INFO
        logs.event(log, level, "broker not reached: counters not checked against its retained states"
                   + ("; a recorded frame of a bin whose counter was lost could be accepted" if report.lost else ""),
                   waited_s=wait)
        return
    valid = valid_states(cfg, states, devices, metrics, time.time())
    report.newest_synced_time = newest_synced_time(valid)
    if not report.needs_counters:
        return  # our own counters are whole: a retained state could only be older, or not ours
    counters, bins = counters_from_states(valid, box.bins())
    local = box.counters()
    raised = {d: c for d, c in counters.items() if d not in local or local[d].key_id != c.key_id or local[d].fcnt < c.fcnt}
    if raised:
        box.raise_counters(raised, bins)
        metrics.counters_from_broker.inc(len(raised))
        logs.event(log, logging.ERROR if report.lost else logging.WARNING,
                   "frame counters raised from the broker's retained states", devices=len(raised),
                   retained_states=len(states), valid_states=len(valid))


# the whole start-up ---------------------------------------------------------------------------
def open_state(cfg, db_path, devices, metrics, stop_event, keepalive=lambda: None):
    """Checks, repairs and opens the outbox; returns (Outbox, Report). Waits (keepalive() between
    tries) while the disk is too full to open it."""
    report = Report()
    damaged = find_problems(db_path, report)
    for code in report.problems:
        metrics.state_problems.labels(code).inc()
    box = _open(db_path, stop_event, keepalive)
    if not {"wal_missing", "wal_damaged"} & set(report.problems):
        _check_commit_mark(box, report, metrics)
    if damaged is not None:
        try:
            carry_over(box, salvage(damaged), report, devices)
        except StorageFull:
            logs.event(log, logging.ERROR, "storage full: nothing carried over from the damaged state file", copy=damaged)
        for table, n in report.salvaged.items():
            metrics.state_salvaged.labels(table).inc(n)
        logs.event(log, logging.ERROR, "carried over from the damaged state file", unreadable_outbox_rows=report.unreadable_rows,
                   highest_row_id=report.highest_row_id, **report.salvaged)
        if any(report.rebuilt.values()):
            logs.event(log, logging.ERROR, "counters and bin states rebuilt from the salvaged outbox rows (their table "
                       "was lost or behind them)", **{k + "_rebuilt": v for k, v in report.rebuilt.items()})
    if "wal_missing" in report.problems:
        _say_wal_loss(box, report)
    _write_marker(db_path)
    try:
        use_retained_states(cfg, box, devices, report, metrics)
    except StorageFull:
        logs.event(log, logging.ERROR, "storage full: counters from the broker not stored")
    return box, report


def _check_commit_mark(box, report, metrics):
    """After a crash of the process, the RAM mark (storage.CommitMark) names the newest row that was
    committed: a file with fewer rows lost committed frames of its WAL, cut at a frame boundary
    where walcheck.py sees nothing wrong (it needs the -shm, which exclusive locking does away with)."""
    marked = box.mark.read()
    newest = box.newest_id()
    if marked is not None and newest < marked:
        _problem(report, "wal_damaged", "committed readings are missing after an unclean stop (the WAL lost its "
                 "newest frames): counters come from the broker's retained states", rows_lost=marked - newest,
                 highest_row_id=newest)
        metrics.state_problems.labels("wal_damaged").inc()
        box.mark.write(newest)


def _say_wal_loss(box, report):
    """The WAL is gone: the commits in it are lost, and nothing here knows how many. Said with what
    is known: the rows still pending, the newest row id left, the counters' upto_id (rows up to it
    were committed once), and the gap between them when the counters name a row that is gone."""
    try:
        db = box.db
        highest = db.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0]
        upto = db.execute("SELECT coalesce(max(upto_id), 0) FROM counters").fetchone()[0]
        pending = db.execute("SELECT count(*) FROM outbox WHERE acked_at IS NULL").fetchone()[0]
    except sqlite3.Error as e:
        logs.event(log, logging.ERROR, "pending readings may be lost with the WAL; the state file cannot say more",
                   error=str(e))
        return
    logs.event(log, logging.ERROR, "pending readings may be lost with the WAL: readings accepted after the last "
               "checkpoint are gone, their number is not known here", pending_rows_left=pending,
               highest_row_id=highest, counters_upto_id=upto, rows_known_lost=max(0, upto - highest))


def _open(db_path, stop_event, keepalive):
    said = False
    while True:
        try:
            return Outbox(db_path)
        except StorageFull as e:
            if not said:
                logs.event(log, logging.ERROR, "storage full: cannot open the state file, waiting for room", path=db_path,
                           error=str(e))
                said = True
            keepalive()
            if stop_event.wait(FULL_RETRY_S):
                raise
