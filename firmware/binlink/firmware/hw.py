# Hardware boundary: the only module that touches machine, esp32, network and sleep.
# Everything else gets this module (or the simulator's stand-in with the same functions) as `hw`.
import time
import machine
import esp32

_uarts = {}
_pins = {}  # pad -> (mode, pull, machine.Pin): a pad is set up once a wake, again only for a new role
_wdt = None
_nvs = None

RESET_CAUSES = {
    machine.PWRON_RESET: 1,
    machine.HARD_RESET: 2,
    machine.WDT_RESET: 3,
    machine.DEEPSLEEP_RESET: 4,
    machine.SOFT_RESET: 5,
}


def reset_cause():
    """Index into codec.RESET_CAUSES (4 = woke from deep sleep)."""
    return RESET_CAUSES.get(machine.reset_cause(), 0)


def ticks_ms():
    return time.ticks_ms()


def ticks_diff(a, b):
    return time.ticks_diff(a, b)


def time_s():
    return time.time()  # the RTC keeps counting through deep sleep


def time_ms():
    """Wall-clock milliseconds by the RTC (the same clock as time_s, finer)."""
    return time.time_ns() // 1000000


def sleep_ms(ms):
    time.sleep_ms(ms)


def deepsleep(ms):
    try:
        _arm(_ext0)
    except Exception:  # noqa: BLE001 - a wake that failed ends in deep sleep all the same: on the timer alone
        pass
    machine.deepsleep(ms)


_ext0 = None  # (pin, level) the next deep sleep wakes on
_armed = 0  # what ext0 is set to on the chip: (pin, level), None (off), or 0: not known this wake


def wake_on_pin(pin, level):
    """The deep sleep wakes when `pin` reaches `level` (set on the chip when it goes to sleep)."""
    global _ext0
    _ext0 = (pin, level)


def _arm(want):
    """ext0 set to `want` ((pin, level) or None) unless it already is: the port keeps the setting
    (machine_rtc_config) for every sleep after, light or deep."""
    global _armed
    if want != _armed:
        if want is None:
            esp32.wake_on_ext0(None)
        else:
            esp32.wake_on_ext0(_input(want[0]), want[1])
        _armed = want


def light_sleep(ms, pin=-1, level=0):
    """machine.lightsleep(ms) (~0.8 mA, the UART stops receiving), woken early when `pin` is at
    `level` (ext0 serves light sleep too); pin < 0: only by the time. The deep sleep's own ext0
    wake is set when it begins (deepsleep), not after every light sleep."""
    _arm((pin, level) if pin >= 0 else None)
    machine.lightsleep(ms)


def rtc_read():
    return bytes(machine.RTC().memory())


def rtc_write(data):
    machine.RTC().memory(data)


def _nvs_store():
    global _nvs
    if _nvs is None:
        _nvs = esp32.NVS("binlink")
    return _nvs


def nvs_get(key):
    try:
        return _nvs_store().get_i32(key)
    except OSError:
        return None


def nvs_set(key, value):
    store = _nvs_store()
    store.set_i32(key, value)
    store.commit()


def nvs_get_blob(key, size):
    """The blob stored under key (at most size bytes), or None."""
    buf = bytearray(size)
    try:
        n = _nvs_store().get_blob(key, buf)
    except OSError:
        return None
    return bytes(buf[:n])


def nvs_set_blob(key, data):
    """One key, one commit: NVS writes a blob whole or not at all (ESP-IDF's NVS is atomic per entry)."""
    store = _nvs_store()
    store.set_blob(key, data)
    store.commit()


def _pin(pin, mode, pull=-1):
    """The pad's Pin in this role; configured (machine_pin.c: pad, direction, pull) only when the
    role is new this wake: reconfiguring a pad for every read or write is wasted time awake."""
    p = _pins.get(pin)
    if p is None or p[0] != mode or p[1] != pull:
        p = _pins[pin] = (mode, pull, machine.Pin(pin, mode, pull))
    return p[2]


def _input(pin):
    return _pin(pin, machine.Pin.IN, machine.Pin.PULL_UP)


def pin_write(pin, value, hold=False):
    """hold=True latches the pad through deep sleep (unheld pads float while the chip sleeps);
    a held pad changes only through init, which machine_pin.c does as: unhold, set, re-hold."""
    if hold:
        _pins.pop(pin, None)
        machine.Pin(pin, machine.Pin.OUT, value=value, hold=True)
    else:
        _pin(pin, machine.Pin.OUT).value(value)


def pin_read(pin):
    return _input(pin).value()


def pulse_us(trig, echo, timeout_us):
    """20 us trigger (the JSN-SR04T's vendor note; the HC-SR04 wants 10), then the echo's high
    time; -1/-2 are time_pulse_us's timeouts. The trigger is driven low once a wake, a moment
    before its first edge: between pings it stays low."""
    fresh = trig not in _pins
    t = _pin(trig, machine.Pin.OUT)
    if fresh:
        t.value(0)
        time.sleep_us(5)
    e = _pin(echo, machine.Pin.IN)
    t.value(1)
    time.sleep_us(20)
    t.value(0)
    return machine.time_pulse_us(e, 1, timeout_us)


def _uart(port):
    u = _uarts.get(port[0])
    if u is None:
        uid, baud, tx, rx = port
        u = machine.UART(uid, baudrate=baud, tx=tx, rx=rx, timeout=0)
        _uarts[uid] = u
    return u


def uart_write(port, data):
    """port: (uart id, baud, tx pin, rx pin)."""
    _uart(port).write(data)


def uart_read(port, n, timeout_ms):
    u = _uart(port)
    buf = b""
    start = time.ticks_ms()
    while len(buf) < n and time.ticks_diff(time.ticks_ms(), start) < timeout_ms:
        chunk = u.read(n - len(buf))
        if chunk:
            buf += chunk
        else:  # nothing yet: wait about as long as the missing bytes take on the wire
            time.sleep_ms(max(2, (n - len(buf)) * 10000 // port[1]))
    return buf


def uart_readline(port, timeout_ms):
    """One reply line (up to and including \\n), or what came before the timeout."""
    u = _uart(port)
    buf = b""
    start = time.ticks_ms()
    while b"\n" not in buf and time.ticks_diff(time.ticks_ms(), start) < timeout_ms:
        chunk = u.read()
        if chunk:
            buf += chunk
        else:
            time.sleep_ms(2)
    return buf


def uart_read_any(port):
    """What has arrived on the UART so far (b"" when nothing), without waiting."""
    return _uart(port).read() or b""


def uart_flush(port):
    """Returns once the last byte written has left the UART (write() only queues it)."""
    _uart(port).flush()


def uart_flush_input(port):
    u = _uart(port)
    while u.any():
        u.read()


def battery_mv(pin, enable_pin=-1):
    """Battery through a 1:2 divider on an ADC pin (11 dB attenuation reads up to ~3.1 V). With
    enable_pin the divider is switched on only for the reading: 2 x 100 kOhm across the cell
    would draw ~18 uA for ever, as much as the rest of the sleeping board."""
    if enable_pin >= 0:
        pin_write(enable_pin, 1)
        time.sleep_ms(1)  # the ADC input settles (RC of the divider and the pin)
    try:
        adc = machine.ADC(machine.Pin(pin), atten=machine.ADC.ATTN_11DB)
        return adc.read_uv() * 2 // 1000
    finally:
        if enable_pin >= 0:
            pin_write(enable_pin, 0)


POWER_ON_C = 85.0  # the DS18B20's scratchpad after power-on, until a conversion completes


def _ds18(pin, bits):
    import onewire
    import ds18x20

    ds = ds18x20.DS18X20(onewire.OneWire(machine.Pin(pin)))
    roms = ds.scan()
    if not roms:
        return None, None
    ds.write_scratch(roms[0], bytes([0, 0, ((bits - 9) << 5) | 0x1F]))  # TH, TL, config register
    return ds, roms[0]


def temperature_start(pin, bits=9):
    """Starts a DS18B20 conversion and returns at once, so that it runs while the ultrasonic
    sensor powers up; temperature_c(pin, bits, started) reads it. None when absent or failing
    (temperature_c then converts on its own)."""
    try:
        ds, rom = _ds18(pin, bits)
        if ds is None:
            return None
        ds.convert_temp()
        return ds, rom, time.ticks_ms()
    except Exception:  # noqa: BLE001 - ImportError, OneWireError: the reading goes on without it
        return None


def temperature_c(pin, bits=9, started=None):
    """DS18B20 on a 1-Wire pin at `bits` resolution (9: 0.5 °C in 94 ms; 12: 0.0625 °C in
    750 ms); None when absent or unreadable. ds18x20 raises OneWireError when the sensor does not
    answer a reset and Exception("CRC error") on a corrupted scratchpad: up to three attempts
    (the conversion temperature_start began is the first), then None, so a bad sensor costs the
    temperature, never the reading. 85.0 is the power-on value: it counts only when a second
    conversion confirms it (a fire reads 85 twice; a lost conversion once)."""
    conv_ms = (750 >> (12 - bits)) + 5
    last = None
    attempts = 3
    if started is not None:
        ds, rom, t0 = started
        left = conv_ms - time.ticks_diff(time.ticks_ms(), t0)
        if left > 0:
            time.sleep_ms(left)
        attempts = 2
        try:
            t = ds.read_temp(rom)
            if t != POWER_ON_C:
                return t
            last = t
        except Exception:  # noqa: BLE001 - as below
            pass
    for _ in range(attempts):
        try:
            ds, rom = _ds18(pin, bits)
            if ds is None:
                return None
            ds.convert_temp()
            time.sleep_ms(conv_ms)
            t = ds.read_temp(rom)
        except ImportError:
            return None
        except Exception:  # noqa: BLE001 - OneWireError and the driver's bare CRC Exception
            continue
        if t != POWER_ON_C or last == POWER_ON_C:
            return t
        last = t
    return None


def wdt_start(timeout_ms):
    global _wdt
    _wdt = machine.WDT(timeout=timeout_ms)


def wdt_feed():
    if _wdt is not None:
        _wdt.feed()


def wifi_connect(ssid, password, timeout_ms):
    import network

    w = network.WLAN(network.STA_IF)
    w.active(True)
    if not w.isconnected():
        w.connect(ssid, password)
        start = time.ticks_ms()
        while not w.isconnected():
            if time.ticks_diff(time.ticks_ms(), start) > timeout_ms:
                return False
            time.sleep_ms(50)
    return True


def wifi_off():
    import network

    network.WLAN(network.STA_IF).active(False)


MQTT_TIMEOUT_S = 5  # a silent broker must end in an OSError, not in a watchdog reset


def mqtt_open(client_id, host, port, user, password):
    """One MQTT session for the wake (clean: nothing queued for the bin while it sleeps)."""
    from umqtt.simple import MQTTClient, MQTTException

    c = MQTTClient(client_id, host, port=port, user=user or None, password=password or None, keepalive=0)
    try:
        c.connect(timeout=MQTT_TIMEOUT_S)  # the socket timeout also bounds the waits for SUBACK and PUBACK
    except MQTTException as e:  # CONNACK's refusal (credentials, client id): the link failed like any other
        raise OSError("broker refused the connection: %s" % e)
    return c


def mqtt_subscribe(c, topic, inbox):
    """Messages on topic are appended to inbox (list) as they are read. False when the broker
    refuses the subscription (SUBACK 0x80: its ACL): the session still publishes."""
    from umqtt.simple import MQTTException

    c.set_callback(lambda t, m: inbox.append(m))
    try:
        c.subscribe(topic)
    except MQTTException:
        return False
    return True


def mqtt_publish(c, topic, payload):
    c.sock.settimeout(MQTT_TIMEOUT_S)  # umqtt's wait_msg leaves the socket blocking with no timeout
    c.publish(topic, payload, qos=1)


def mqtt_poll(c):
    """Reads what has arrived (into the subscription's inbox) without waiting."""
    c.check_msg()


def mqtt_close(c):
    try:
        c.disconnect()
    except OSError:
        pass  # the broker is gone already: the session ends either way
