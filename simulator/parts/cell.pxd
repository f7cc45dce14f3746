# Read by Cython only (simulator/compiled.py): the compiled cell's state in fixed slots (the board
# asks it at every step of the clock).
cdef class LiSOCl2Cell:
    cdef dict __dict__
    cdef public object capacity_mah, used_mah, age_years, temp_c, passivation, _held, _fixed, _held_up
