# Firmware-only modules: flashed to the ESP32, never installed with the gateway.
