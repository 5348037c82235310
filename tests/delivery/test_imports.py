"""The delivery package has no import cycle and needs no lazy re-export.

Each module is imported first, alone, in a fresh interpreter (a module that
only works when another was imported before it fails here), and the names
callers import are where they import them from. smtp/received.py, which
writes the header every delivered message starts with, needs nothing from
delivery at all.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DELIVERY_MODULES = [
    "mailfilter.delivery", "mailfilter.delivery.envelope", "mailfilter.delivery.base",
    "mailfilter.delivery.spool", "mailfilter.delivery.maildir",
    "mailfilter.delivery.qmailqueue", "mailfilter.delivery.forward",
    "mailfilter.delivery.discard", "mailfilter.delivery.nexthop",
    "mailfilter.delivery.tlsclient",
]


def fresh(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.mark.parametrize("module", DELIVERY_MODULES + ["mailfilter.smtp.received"])
def test_imports_first_in_a_fresh_interpreter(module):
    # every spec kind is registered however the package was entered
    p = fresh(f"import {module}\n"
              "from mailfilter.delivery import Delivery\n"
              "print(sorted(Delivery._kinds))")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[0] == str(sorted(
        ["discard", "lmtp", "lmtp+tls-required", "maildir", "qmail-queue", "smtp",
         "smtp+tls-required"]))


def test_received_needs_nothing_from_delivery():
    p = fresh("import sys, mailfilter.smtp.received\n"
              "print(sorted(m for m in sys.modules if m.startswith('mailfilter.delivery')))")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_no_lazy_re_export():
    import mailfilter.delivery as pkg
    assert "__getattr__" not in vars(pkg)


@pytest.mark.parametrize("module,names", [
    ("mailfilter.delivery", ["Delivery", "Sink", "Envelope", "DeliveryResult", "SpoolFacts",
                             "from_spec", "MaildirDelivery", "QmailQueueDelivery",
                             "SmtpDelivery", "LmtpDelivery", "DiscardDelivery",
                             "HANDOVER_TIMEOUT", "QQ_EXITS", "smtp_encode", "smtp_path"]),
    ("mailfilter.delivery.maildir", ["MaildirDelivery", "envelope_headers"]),
    ("mailfilter.delivery.qmailqueue", ["QmailQueueDelivery", "QQ_EXITS", "qq_reply",
                                        "qq_envelope"]),
    ("mailfilter.delivery.forward", ["SmtpDelivery", "LmtpDelivery", "smtp_encode",
                                     "ehlo_keywords", "mail_parameters",
                                     "SmtpTlsRequiredDelivery", "LmtpTlsRequiredDelivery"]),
    ("mailfilter.delivery.nexthop", ["Connection", "NextHopError", "TLSFailed"]),
    ("mailfilter.delivery.tlsclient", ["client_context", "describe", "failure_text"]),
])
def test_public_names_stay_where_callers_import_them(module, names):
    p = fresh(f"from {module} import {', '.join(names)}")
    assert p.returncode == 0, p.stderr


def test_from_spec_is_the_class_method():
    from mailfilter import delivery
    assert delivery.from_spec("discard").spec == "discard"
    assert delivery.from_spec is delivery.Delivery.from_spec


def test_a_kind_without_parse_cannot_register():
    """Delivery.from_spec calls the kind's parse(): a hop that registers a
    kind without one is refused when its class is made, not at the first
    message."""
    import pytest
    from mailfilter.delivery import Delivery

    with pytest.raises(TypeError, match="'nothing-here'.*no parse"):
        class Broken(Delivery, kind="nothing-here", form="nothing-here:X"):
            def open(self, env):
                raise AssertionError("never made")
    assert "nothing-here" not in Delivery._kinds
