"""Serial stand-in: a pseudo-terminal whose slave end the gateway opens through pyserial.

A stable symlink at `link` points to the pty's slave (like /dev/serial/by-id/...); `unplug()`
closes the pty and removes the link, `plug()` creates a new pty behind the same link."""
import os
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

    def close(self):
        self.unplug()
