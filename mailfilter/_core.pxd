# _core.pxd: the declarations of mailfilter._core's cdef classes that keep
# their fields apart from their code (the SMTP engine: smtp.pxd). Cython reads
# this file with _core.pyx; the other .pxi files declare their fields inline.
include "smtp.pxd"
