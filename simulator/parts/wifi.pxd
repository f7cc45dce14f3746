# Read by Cython only (simulator/compiled.py): WifiOps is the base of the compiled Board (board.pxd).
cdef class WifiOps:
    pass
