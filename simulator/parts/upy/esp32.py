# `esp32` on the simulated board: NVS (ports/esp32/esp32_nvs.c) and the ext0 wake.
from _host import call

WAKEUP_ALL_LOW = False
WAKEUP_ANY_HIGH = True


def wake_on_ext0(pin, level):
    call("wake_on_ext0", pin.id, level)


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

    def commit(self):
        call("nvs_commit", self.ns)
