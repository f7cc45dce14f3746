"""Read stage: one thread per serial source, pyserial, reopened as soon as an unplugged radio is back.

The port is opened by the path in the config (a stable /dev/serial/by-id/... symlink), resolved
again on every open, so a radio that comes back under another ttyUSBn is found. While the path is
missing the thread watches for it (a stat every 0.1 s) and opens the radio the moment it
reappears: frames sent right after a replug are not lost to a back-off. A port that exists but
will not open (permissions, held by another program) is retried with a back-off up to 10 s, cut
short when the device behind the path changes. Each chunk read goes through the source's module
format; receptions go to the pipeline's queue."""
import logging
import os
import threading
import time

import serial

from binlink.gateway import logs, module_formats

log = logs.get("serial")
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 10.0
WATCH_S = 0.1  # how often a missing or unopenable port's path is looked at
WRITE_TIMEOUT_S = 0.5  # a downlink write blocked longer (flow control, a hung module) fails: the bin's window is short
# after a write timed out, writes are refused at once for this long: a module that stopped reading its
# UART costs the pipeline (whose thread writes the answers) one WRITE_TIMEOUT_S, not one per answer
WEDGED_S = 30.0


class SerialSource(threading.Thread):
    def __init__(self, source, out_queue, metrics, stop_event):
        super().__init__(name="serial-%s" % source.name, daemon=True)
        self.source = source
        self.queue = out_queue
        self.metrics = metrics
        self.stop_event = stop_event
        self.connected = threading.Event()
        self._port = None  # the open port, for send(); reads stay on this thread
        self._write_lock = threading.Lock()
        self._wedged_until = 0.0  # time.monotonic() before which send() refuses at once (WEDGED_S)

    def send(self, data):
        """Writes data (a downlink in the module's format) from any thread: True when written. A port
        that is closed, or a write that fails or times out, returns False; the reader carries on (a
        lost port is its to notice and reopen). A write that timed out makes the next WEDGED_S of
        writes fail at once."""
        with self._write_lock:
            port = self._port
            if port is None or time.monotonic() < self._wedged_until:
                return False
            try:
                port.write(data)  # into the kernel's buffer: no tcdrain, which would hold the caller for the line's time
                return True
            except serial.SerialTimeoutException as e:
                self._wedged_until = time.monotonic() + WEDGED_S
                logs.event(log, logging.WARNING, "serial port not taking writes: answers refused for a while",
                           source=self.source.name, error=_short(e), refused_s=WEDGED_S)
                return False
            except (serial.SerialException, OSError, ValueError, TypeError) as e:
                logs.event(log, logging.WARNING, "cannot write to the serial port", source=self.source.name, error=_short(e))
                return False

    def run(self):
        backoff = BACKOFF_MIN_S
        failures = 0
        opened_before = False
        while not self.stop_event.is_set():
            try:
                port = serial.Serial(self.source.port, self.source.baud, timeout=0.05, write_timeout=WRITE_TIMEOUT_S,
                                     exclusive=True)
            except (serial.SerialException, OSError, ValueError) as e:
                failures += 1
                if failures == 1 or failures % 20 == 0:  # log the first failure, then now and then
                    logs.event(log, logging.WARNING, "cannot open serial port", source=self.source.name,
                               port=self.source.port, error=_short(e), retry_s=round(backoff, 1))
                self._wait_for_change(backoff)
                backoff = min(BACKOFF_MAX_S, backoff * 2)
                continue
            if opened_before:  # a reopen after a loss; the first open is not one
                self.metrics.serial_reopens.labels(self.source.name).inc()
            opened_before = True
            self.metrics.serial_connected.labels(self.source.name).set(1)
            logs.event(log, logging.INFO, "serial port open", source=self.source.name, port=self.source.port,
                       baud=self.source.baud, format=self.source.format)
            backoff, failures = BACKOFF_MIN_S, 0
            with self._write_lock:
                self._port = port
                self._wedged_until = 0.0  # a port opened again is tried again
            self.connected.set()
            try:
                self._read(port)
            except (serial.SerialException, OSError) as e:
                logs.event(log, logging.WARNING, "serial port lost", source=self.source.name, error=_short(e))
            finally:
                with self._write_lock:  # no write lands on a port being closed
                    self._port = None
                self.connected.clear()
                self.metrics.serial_connected.labels(self.source.name).set(0)
                try:
                    port.close()
                except (serial.SerialException, OSError):
                    pass
            self._wait_for_change(BACKOFF_MIN_S)

    def _wait_for_change(self, delay_s):
        """Waits up to delay_s, less when the device behind the path appears or changes (replugged)."""
        seen = _device_of(self.source.port)
        deadline = time.monotonic() + delay_s
        while not self.stop_event.wait(WATCH_S):
            now = _device_of(self.source.port)
            if (now is not None and now != seen) or time.monotonic() >= deadline:
                return
            seen = now

    def _read(self, port):
        fmt = module_formats.make(self.source.format)  # fresh state: a partial frame does not span reopens
        name = self.source.name
        while not self.stop_event.is_set():
            data = port.read(max(1, min(port.in_waiting, 65536)))
            if data:
                recs = fmt.feed(data)
                if recs:
                    self.queue.put((name, recs))  # one queue operation per read, not per frame


def _device_of(path):
    """(device number, inode) of what the path points at now; None when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev, st.st_ino


def _short(e):
    return str(e).splitlines()[0][:200]
