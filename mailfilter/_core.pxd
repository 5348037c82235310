# _core.pxd: the declarations of mailfilter._core's cdef classes that keep
# their fields apart from their code (the SMTP engine: _core/smtp.pxd).
# Cython looks for a module's .pxd by its full name (mailfilter/_core.pxd on
# the include path, which setup.py extends with "."), not beside
# _core/_core.pyx, hence this file here; the other .pxi files declare their
# fields inline.
include "smtp.pxd"
