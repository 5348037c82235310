"""What the policy takes in and hands out: the Client, DNS answers, Verdicts.

Job: the value types every policy module shares, and the accept verdicts
without variable parts, built once for every session.

Invariants: a Verdict is read-only once built: the constants below and the
engine's verdict caches hand the same object to many sessions. Rule ids are
the compiled matchers' ids, >= 0; NO_RULE (-1, the matchers' "no match")
stands for a decision no rule made.
"""
from __future__ import annotations

from mailfilter.core import core
from mailfilter.smtp.replies import Reply, reply

# A DNS answer handed in by the caller (set_helo_dns / set_mail_dns)
DNS_OK, DNS_FAIL, DNS_TEMP = "ok", "fail", "temp"
DNS_NULLMX = "nullmx"       # the domain says it takes no mail (RFC 7505)

NO_RULE = -1                # no rule decided (and no rule matched)


class Verdict:
    """One policy answer. Accept verdicts without variable parts are shared
    constants (built once per engine), so treat Verdicts as read-only."""

    __slots__ = ("stage", "accept", "reply", "reason", "rule", "delay", "close", "recipient")

    def __init__(self, stage: str, accept: bool, reply: Reply, reason: str,
                 rule: str | None = None, delay: float = 0.0, close: bool = False,
                 recipient: str | None = None):
        self.stage = stage          # CONNECT, HELO, MAIL, RCPT, DATA
        self.accept = accept
        self.reply = reply
        self.reason = reason        # short tag for the decision log
        self.rule = rule            # deciding rule as file:line
        self.delay = delay          # tarpit: seconds to wait before replying
        self.close = close          # close the session after this reply
        self.recipient = recipient  # as delivered (RELAYCLIENT suffix); None = as given

    def __repr__(self) -> str:
        return (f"Verdict({self.stage} {'accept' if self.accept else 'reject'} "
                f"{self.reply} {self.reason} {self.rule})")


# Client(ip, port=0, host="unknown", local_ip="", local_port=0): who
# connected (host: TCPREMOTEHOST, "unknown" when not known). A C type
# (_core/client.pxi) with a dataclass's fields, equality and repr: it is
# built once per connection and a Python class costs 5x more to call.
Client = core.Client


RCPT_OK = reply("rcpt_ok")
MAIL_OK = reply("mail_ok")
V_MAIL_OK = Verdict("MAIL", True, MAIL_OK, "ok")
V_RCPT_OK = Verdict("RCPT", True, RCPT_OK, "ok")
V_RCPT_AUTH = Verdict("RCPT", True, RCPT_OK, "relay_auth")
V_DATA_OK = Verdict("DATA", True, reply("data_go"), "ok")
V_NOTORIOUS = Verdict("DATA", False, reply("notorious_data"), "notorious", close=True)
