# Flashed as /main.py: one wake cycle, then deep sleep (execution restarts here on wake).
from binlink.firmware import app, hw

app.main(hw)
