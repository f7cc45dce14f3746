# binlink: `binlink.wire` (codec, framing, airtime) runs on the ESP32 and in the gateway;
# `binlink.firmware` is flashed to the board only; `binlink.gateway` and `binlink.sim` are CPython.
__version__ = "0.5.0"
