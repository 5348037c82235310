# client.pxi: the policy's Client value (who connected), as a C type.
#
# Job: the value every SMTP connection builds once and every policy session
# reads (mailfilter.policy.verdict re-exports it as Client). It is a C type
# only because building it is on the per-connection path: calling a Python
# class with keywords costs CPython 3.11 a keyword dict, type_call and a
# fresh evaluation loop for __init__ (about 3 300 instructions, 11 % of an
# envelope check; bench/README.md "envelope"); this type's __init__ parses
# the same arguments in C.
#
# Invariants: the constructor, the fields (mutable: the server sets `host`
# once the remote host name is known, docs/behaviour/tcp-smtp.md#settings
# TCPREMOTEHOST), equality, repr and unhashability are those of the
# dataclass it replaces: Client(ip, port=0, host="unknown", local_ip="",
# local_port=0).

cimport cython


@cython.freelist(16)
cdef class Client:
    """Client(ip, port=0, host="unknown", local_ip="", local_port=0): the
    peer address, its port, its host name (TCPREMOTEHOST, "unknown" when
    not known) and the local address and port it connected to."""
    cdef public object ip
    cdef public object port
    cdef public object host
    cdef public object local_ip
    cdef public object local_port

    def __init__(self, ip, port=0, host="unknown", local_ip="", local_port=0):
        self.ip = ip
        self.port = port
        self.host = host
        self.local_ip = local_ip
        self.local_port = local_port

    def _astuple(self):
        return (self.ip, self.port, self.host, self.local_ip, self.local_port)

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._astuple() == (<Client>other)._astuple()

    def __ne__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._astuple() != (<Client>other)._astuple()

    __hash__ = None             # mutable and compared by value, as the dataclass

    def __repr__(self):
        return (f"Client(ip={self.ip!r}, port={self.port!r}, host={self.host!r}, "
                f"local_ip={self.local_ip!r}, local_port={self.local_port!r})")

    def __reduce__(self):
        return (Client, self._astuple())
