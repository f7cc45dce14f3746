# Read by Cython only (simulator/compiled.py); board.py runs unchanged as source. The compiled Board
# keeps the attributes its clock and dispatcher touch at every step in fixed slots instead of its
# instance dict (the rest stay there): attribute lookups were a sixth of a compiled run without them.
from binlink.sim.parts.esp32 cimport Esp32
from binlink.sim.parts.wifi cimport WifiOps

cdef class Board(WifiOps):
    cdef dict __dict__
    cdef public Esp32 esp
    cdef public object now, charge_mAs, _ma, _ma_until, halted, ops, reset_at, error_at, _ops
    cdef public object _due_at, _others_at, _quiet, _radio_event, _steps, _live_steps, _live_events, _other_events
    cdef public object _on_cell, battery, bod_mv, radio, _current_untils, _part_ma, _regulator_ma
    cdef public object _divider_switched, _battery_en_pin, _watchers, _rail_pin, sensor, cfg, _aux_pin
