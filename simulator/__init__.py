"""The simulator: bins, sensors, radio and serial port standing in for the real ones."""
from binlink.sim import compiled

compiled.install()  # the hot modules from their Cython build, when there is one of their source
