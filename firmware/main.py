# Flashed as /main.py: one wake cycle, then deep sleep (execution restarts here on wake).
try:
    from binlink.firmware import app, hw
except Exception as e:  # noqa: BLE001 - a module missing or damaged on flash: sleep, never the REPL at ~40 mA
    import machine

    print("binlink did not load:", repr(e))
    machine.deepsleep(3600 * 1000)  # config.SAFE_SLEEP_S: config itself may be what failed to load
app.main(hw)
