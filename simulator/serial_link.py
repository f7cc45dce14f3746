"""Serial stand-in: a pseudo-terminal whose slave end the gateway opens through pyserial.

A stable symlink at `link` points to the pty's slave (like /dev/serial/by-id/...); `unplug()`
closes the pty and removes the link, `plug()` creates a new pty behind the same link."""
import fcntl
import os
import select
import struct
import termios
import time
import tty


class PtyLink:
    def __init__(self, link, drain=False):
        """drain: the module's side takes what the gateway writes (its answers, which a module puts
        on air) off the line at each write. A fleet that does not deliver answers needs it: a pty
        nobody reads fills in ~4 KB, and the gateway's writes then block."""
        self.link = link
        self.drain = drain
        self.master = None
        self._slave = None
        self.plug()

    @property
    def plugged(self):
        return self.master is not None

    def plug(self):
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no line editing: bytes pass through untouched
        self.master, self._slave = master, slave
        tmp = self.link + ".tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.ttyname(slave), tmp)
        os.replace(tmp, self.link)

    def unplug(self):
        if os.path.lexists(self.link):
            os.unlink(self.link)
        for fd in (self.master, self._slave):
            if fd is not None:
                os.close(fd)
        self.master = self._slave = None

    def write(self, data):
        """Writes all of data; returns False when unplugged (the bytes are lost, as on a real line)."""
        if self.master is None:
            return False
        view = memoryview(data)
        while view:
            n = os.write(self.master, view)
            view = view[n:]
        while self.drain and select.select([self.master], [], [], 0)[0]:
            os.read(self.master, 4096)
        return True

    def pending(self):
        """Bytes written but not yet read by the other side."""
        if self._slave is None:
            return 0
        return struct.unpack("i", fcntl.ioctl(self._slave, termios.FIONREAD, b"\0\0\0\0"))[0]

    def wait_drained(self, timeout_s):
        """Waits until the reader took everything (so closing loses nothing); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.pending():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self):
        self.unplug()
