"""Writing registry files so the gateway can still read them: atomically, keeping the file's owner,
group and mode (docs/gateway.md, Device registry), and key files for `--key-out`."""
import contextlib
import errno
import functools
import os
import stat
import tempfile

import tomli_w


def write(path, data):
    """Writes the registry atomically: a temporary file in the same folder, fsynced, renamed over
    it. An existing file keeps its owner, group and mode (root editing /etc/binlink/devices.toml
    leaves it root:binlink 0640, readable by the service); a new one is made mode 0600. Raises
    PermissionError (for the caller to say in one line) when the folder is not writable."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if st is not None:
                if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                    try:  # root may give any owner; others may keep a group they belong to
                        os.fchown(f.fileno(), st.st_uid if os.geteuid() == 0 else -1, st.st_gid)
                    except PermissionError:
                        raise PermissionError(errno.EPERM, "cannot keep its owner and group %d:%d as uid %d"
                                              % (st.st_uid, st.st_gid, os.geteuid()), path) from None
                os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
            f.write(b"# binlink device registry: holds device keys, keep it mode 0600/0640\n")
            tomli_w.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)  # the rename itself survives a power cut
    finally:
        os.close(dfd)


def create_private(path, owner=None):
    """Opens a new file at path for writing, mode 0600, refusing to overwrite one (a key file must
    not silently replace another bin's key). owner: (uid, gid) to give it (root writing a key for
    the administrator who ran sudo: $SUDO_UID, so it can be read and flashed without root).
    Returns the open binary file; FileExistsError / PermissionError for the caller to say."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    if owner is not None and os.geteuid() == 0:
        os.fchown(fd, *owner)
    return os.fdopen(fd, "wb")


def sudo_owner():
    """(uid, gid) of the user who ran `sudo`, when running as root under sudo; else None."""
    if os.geteuid() != 0:
        return None
    try:
        return int(os.environ["SUDO_UID"]), int(os.environ["SUDO_GID"])
    except (KeyError, ValueError):
        return None


@contextlib.contextmanager
def locked(path):
    """An exclusive lock (flock) on the registry file while it is read, changed and replaced: two
    `make flash` at one workstation, or two administrators, never lose each other's bin. The file
    is replaced by a rename, so a lock taken on the old file is taken again on the new one. With no
    file yet, its folder is locked (when the folder is missing too, there is nobody to exclude)."""
    import fcntl

    path = os.path.abspath(path)
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            try:
                fd = os.open(os.path.dirname(path), os.O_RDONLY)
            except FileNotFoundError:
                yield
                return
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino or (current is None and stat.S_ISDIR(os.fstat(fd).st_mode)):
            break
        os.close(fd)  # replaced (or created) while we waited: lock what is there now
    try:
        yield
    finally:
        os.close(fd)


def exclusive(fn):
    """fn(path, ...) run holding locked(path)."""
    @functools.wraps(fn)
    def run(path, *args, **kw):
        with locked(path):
            return fn(path, *args, **kw)
    return run
