# `esp32` on the simulated board: NVS (ports/esp32/esp32_nvs.c) and the ext0 wake.
from _host import call

WAKEUP_ALL_LOW = False
WAKEUP_ANY_HIGH = True


# RTC_GPIO0-17: the only pads ext0 can watch (modesp32.h RTC_VALID_EXT_PINS)
_RTC_PINS = (0, 2, 4, 12, 13, 14, 15, 25, 26, 27, 32, 33, 34, 35, 36, 37, 38, 39)


def wake_on_ext0(pin, level=WAKEUP_ALL_LOW):
    if pin is not None and pin.id not in _RTC_PINS:
        raise ValueError("invalid pin")  # modesp32.c esp32_wake_on_ext0
    call("wake_on_ext0", None if pin is None else pin.id, level)


class NVS:
    def __init__(self, namespace):
        self.ns = namespace

    def get_i32(self, key):
        v = call("nvs_get", self.ns, key)
        if v is None:
            raise OSError(-4354)  # ESP_ERR_NVS_NOT_FOUND, as esp32_nvs.c raises it
        return v

    def set_i32(self, key, value):
        call("nvs_set", self.ns, key, value)

    def set_blob(self, key, value):
        call("nvs_set", self.ns, key, bytes(value).hex())

    def get_blob(self, key, buf):
        v = call("nvs_get", self.ns, key)
        if v is None:
            raise OSError(-4354)
        data = bytes.fromhex(v)
        if len(data) > len(buf):
            raise OSError(-4364)  # ESP_ERR_NVS_INVALID_LENGTH: the buffer is too small
        buf[:len(data)] = data
        return len(data)

    def commit(self):
        call("nvs_commit", self.ns)
