"""The state file's SQLite settings and what a full disk looks like from outside.

Sized for a Raspberry Pi's SD card (docs/gateway.md, "SD-card write volume"): small pages (a
commit rewrites whole pages), a WAL checkpointed every ~1 MB and cut back afterwards. A full disk
is a state (StorageFull), not a crash: a failed commit leaves nothing behind and the next one
succeeds once there is room again."""
import hashlib
import logging
import os
import sqlite3
import struct

from binlink.gateway import logs
from binlink.gateway.uplink import Reason

log = logs.get("storage")
PAGE_SIZE = 1024  # a commit writes whole pages to the WAL: small pages, fewer bytes per reading
CHECKPOINT_PAGES = 1000  # ~1 MB of WAL between checkpoints: few rewrites of hot pages, bounded size
WAL_LIMIT_BYTES = 1100 * 1024  # the WAL file is cut back to this after a checkpoint
# the state files need this much at start (the first WAL frames, the forecast and downlink files'
# -shm): with less, the service waits for room rather than failing at its next file
ROOM_TO_START = 256 * 1024


class StorageFull(Exception):
    """The disk holding the outbox is full: nothing of the failed write was kept."""


def is_full(error, path):
    """True when a SQLite error means the disk is full. SQLITE_FULL is the usual answer; a write
    or fsync that fails on a volume with no room left can also surface as an I/O error."""
    code = getattr(error, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL:
        return True
    if code is not None and code & 0xFF == sqlite3.SQLITE_IOERR:
        return free_bytes(path) < 64 * 1024
    return False


def free_bytes(path):
    st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    return st.f_bavail * st.f_frsize


def connect(path, timeout=30, exclusive=True):
    """A connection with the outbox's settings; the page size applies to a new file only. It holds
    the file alone (exclusive locking, set before WAL mode is entered): the WAL index stays in this
    process's memory, not in a -shm file the kernel writes back to the card every ~30 s.
    exclusive=False: shared, with a -shm, as binlink before 0.5 kept it."""
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=True)
    try:
        if exclusive:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("PRAGMA page_size=%d" % PAGE_SIZE)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # survives a power cut
        db.execute("PRAGMA wal_autocheckpoint=%d" % CHECKPOINT_PAGES)
        db.execute("PRAGMA journal_size_limit=%d" % WAL_LIMIT_BYTES)
    except BaseException:
        db.close()
        raise
    return db


def mark_open(path):
    """<path>.open says the file is held: a clean close removes it, a crash leaves it, as SQLite
    does its -shm in shared mode (recovery tells a lost WAL by it). Created before any write."""
    with open(path + ".open", "w") as f:
        os.fsync(f.fileno())
    sync_folder(path)


def sync_folder(path):
    """fsync of the folder holding path: a file created or renamed there survives a power cut."""
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def mark_closed(path):
    try:
        os.unlink(path + ".open")
    except FileNotFoundError:
        pass


class CommitMark:
    """The newest outbox row id committed, kept in RAM (/dev/shm) for the state file at `path`. It
    survives a crash of the process, as SQLite's -shm did (which was never fsynced either: a
    power cut leaves neither current), and costs the SD card nothing. After a crash, a file with
    fewer rows than its mark lost committed frames of its WAL (recovery.py)."""
    DIR = "/dev/shm"
    FORMAT = "<3Q"  # the file's device and inode (a file replaced or salvaged is another), newest id

    def __init__(self, path):
        name = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:16]
        self.file = os.path.join(self.DIR, "binlink-%s.mark" % name)
        st = os.stat(path)
        self.identity = (st.st_dev, st.st_ino)
        self.fd = None

    def read(self):
        """The newest id marked for this very file, or None (no mark, another file's, garbage)."""
        try:
            with open(self.file, "rb") as f:
                dev, ino, newest = struct.unpack(self.FORMAT, f.read(struct.calcsize(self.FORMAT)))
        except (OSError, struct.error):
            return None
        return newest if (dev, ino) == self.identity else None

    def write(self, newest):
        """After a commit. Without a RAM disk there is no mark: a crash is then judged as a power cut is."""
        if self.fd is None:
            try:
                self.fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                self.fd = -1
        if self.fd >= 0:
            try:
                os.pwrite(self.fd, struct.pack(self.FORMAT, *self.identity, newest), 0)
            except OSError:
                pass

    def close(self, remove):
        if self.fd is not None and self.fd >= 0:
            os.close(self.fd)
        self.fd = None
        if remove:
            try:
                os.unlink(self.file)
            except OSError:
                pass


def write(db, path, work):
    """Runs work(db) in one write transaction. A full disk raises StorageFull; SQLite may already
    have rolled the transaction back itself, so roll back only what is still open."""
    try:
        db.execute("BEGIN IMMEDIATE")
        result = work(db)
        db.execute("COMMIT")
        return result
    except BaseException as e:
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the original error says more
        if isinstance(e, sqlite3.OperationalError) and is_full(e, path):
            raise StorageFull("%s (free: %d bytes)" % (e, free_bytes(path))) from e
        raise


class StorageGuard:
    """The full-disk state as the outside sees it: one clear log line when the disk fills and one
    when there is room again, the binlink_storage_full gauge, the frames refused meanwhile. Both
    writers of the state file report to it: readings (refused) and acknowledgements (kept)."""

    def __init__(self, metrics, path):
        self.metrics = metrics
        self.path = path
        self.full = False
        self.refused = 0  # frames refused in the current full spell
        self._said = set()  # what the current spell has already said: each consequence once

    def refuse(self, error, frames):
        self.metrics.rejected.labels(Reason.STORAGE_FULL).inc(frames)
        self.refused += frames
        self._filled(error, "new frames are refused until there is room again; what the outbox holds is still published")

    def acks_kept(self, error, waiting):
        self._filled(error, "broker acknowledgements cannot be written: kept in memory and written once there is "
                            "room; nothing is published twice meanwhile", acks_waiting=waiting)

    def _filled(self, error, consequence, **fields):
        self.full = True
        self.metrics.storage_full.set(1)
        if consequence not in self._said:
            self._said.add(consequence)
            logs.event(log, logging.ERROR, "storage full: " + consequence, path=self.path,
                       free_bytes=free_bytes(self.path), error=str(error.__cause__ or error), **fields)

    def ok(self):
        if self.full:
            self.full = False
            self.metrics.storage_full.set(0)
            logs.event(log, logging.WARNING, "storage has room again", path=self.path,
                       free_bytes=free_bytes(self.path), refused=self.refused)
            self.refused = 0
            self._said.clear()
