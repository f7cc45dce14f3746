"""Serial stand-in: a pseudo-terminal whose slave end the gateway opens through pyserial.

A stable symlink at `link` points to the pty's slave (like /dev/serial/by-id/...); `unplug()`
closes the pty and removes the link, `plug()` creates a new pty behind the same link."""
import fcntl
import os
import struct
import termios
import time
import tty


class PtyLink:
    def __init__(self, link):
        self.link = link
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
