# Logging through MicroPython's logging module (`mpremote mip install logging`); a print-based
# stand-in with the same calls where it is not installed, so a missing package never stops a bin.
import sys

try:
    import logging

    if sys.implementation.name == "micropython":  # on a host (simulator) the host configures logging
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s:%(message)s")

    def get(name):
        return logging.getLogger("binlink.fw." + name)

except ImportError:

    class _Logger:
        def __init__(self, name):
            self.name = name

        def _log(self, level, msg, args):
            print("%s:%s:%s" % (level, self.name, msg % args if args else msg))

        def debug(self, msg, *args):
            pass

        def info(self, msg, *args):
            self._log("INFO", msg, args)

        def warning(self, msg, *args):
            self._log("WARNING", msg, args)

        def error(self, msg, *args):
            self._log("ERROR", msg, args)

    def get(name):
        return _Logger(name)
