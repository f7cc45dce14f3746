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
        """The Dallas/Maxim CRC8 (x^8 + x^5 + x^4 + 1, LSB first; _onewire.crc8 in C on the chip),
        a nibble at a time: _NIBBLE[n] is the shift register run over 4 bits from n."""
        crc = 0
        for b in data:
            crc ^= b
            crc = (crc >> 4) ^ _NIBBLE[crc & 0x0F]
            crc = (crc >> 4) ^ _NIBBLE[crc & 0x0F]
        return crc


_NIBBLE = (0x00, 0x9D, 0x23, 0xBE, 0x46, 0xDB, 0x65, 0xF8, 0x8C, 0x11, 0xAF, 0x32, 0xCA, 0x57, 0xE9, 0x74)
