"""mailfilter: a high-volume SMTP front-end in the qmail/spamcontrol tradition.

The package is pure Python; the hot paths live in the one extension
mailfilter._core (built from _core/_core.pyx). There is no pure-Python fallback:
a missing extension is an ImportError with a hint (see mailfilter.core).
"""

__version__ = "0.1.0"
PRODUCT = "mailfilter"
