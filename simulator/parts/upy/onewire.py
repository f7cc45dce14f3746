# `onewire` on the simulated board at transaction level (micropython-lib/micropython/drivers/bus/onewire).
from _host import call


class OneWireError(Exception):
    pass


class OneWire:
    def __init__(self, pin):
        self.pin = pin.id

    def reset(self, required=False):
        present = call("ow_reset", self.pin)
        if required and not present:
            raise OneWireError
        return present

    def scan(self):
        return [bytearray.fromhex(r) for r in call("ow_scan", self.pin)]

    @staticmethod
    def crc8(data):
        crc = 0
        for b in data:
            for _ in range(8):
                mix = (crc ^ b) & 1
                crc >>= 1
                if mix:
                    crc ^= 0x8C
                b >>= 1
        return crc
