# The MicroPython API stand-ins' one way out: every call goes to the simulated board on the host.
# On the MicroPython VM `hw_call` is the session's host function (JSON: bytes travel as hex); on
# CPython the loader (binlink.sim.parts.board) puts the board's dispatcher in this module's globals.
try:
    hw_call
except NameError:
    import __main__

    hw_call = __main__.hw_call


class Halt(BaseException):
    """The chip reset or entered deep sleep: nothing after this point runs (not even `finally`
    blocks, which the board answers with Halt again)."""


def call(op, *args):
    return answer(hw_call(op, list(args)))


def answer(r):
    """The board's answer to a call: its value, or the halt, Ctrl-C or fault it reports, raised."""
    if type(r) is dict:
        if "halt" in r:
            raise Halt(r["halt"])
        if "interrupt" in r:  # Ctrl-C on a virtual board's console
            raise KeyboardInterrupt
        raise OSError(r["oserror"])
    return r
