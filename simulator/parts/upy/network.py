# `network` on the simulated board: the station interface against the host's access-point model.
from _host import call

STA_IF = 0
AP_IF = 1


class WLAN:
    def __init__(self, interface=STA_IF):
        self.interface = interface

    def active(self, on=None):
        return call("wlan_active", on)

    def connect(self, ssid, key=None):
        call("wlan_connect", ssid, key)

    def isconnected(self):
        return call("wlan_isconnected")

    def disconnect(self):
        call("wlan_active", False)
