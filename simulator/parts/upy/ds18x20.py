# `ds18x20` on the simulated board: the calls and the failures of micropython-lib's driver
# (micropython/drivers/sensor/ds18x20/ds18x20.py): reset(True) raises OneWireError when nothing
# answers, read_scratch raises Exception("CRC error") on a bad scratchpad.
from _host import call


class DS18X20:
    def __init__(self, onewire):
        self.ow = onewire
        self.buf = bytearray(9)

    def scan(self):
        return [rom for rom in self.ow.scan() if rom[0] in (0x10, 0x22, 0x28)]

    def convert_temp(self):
        self.ow.reset(True)
        call("ds_convert", self.ow.pin)

    def read_scratch(self, rom):
        self.ow.reset(True)
        buf = bytearray.fromhex(call("ds_read_scratch", self.ow.pin, bytes(rom).hex()))
        if self.ow.crc8(buf):
            raise Exception("CRC error")
        return buf

    def write_scratch(self, rom, buf):
        self.ow.reset(True)
        call("ds_write_scratch", self.ow.pin, bytes(rom).hex(), bytes(buf).hex())

    def read_temp(self, rom):
        buf = self.read_scratch(rom)
        t = buf[1] << 8 | buf[0]
        if t & 0x8000:
            t = -((t ^ 0xFFFF) + 1)
        return t / 16
