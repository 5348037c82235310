"""Golden files for the compiler and policy (Postfix dict_cidr .in/.ref style).

Each directory under tests/rules/golden/ holds `rules/` (a rules directory),
`queries` (one lookup per line) and `expected` (diagnostics, then one answer
per query). The answers were checked by hand against
docs/behaviour/control-files.md#which-match-wins, #regular-expressions, #rcpthosts,
#decorated-entries, #recipients, #qregex-dialect, docs/behaviour/tcp-smtp.md#settings,
docs/behaviour/smtp.md#pending-verdicts, #rcpt-checks. Regenerate after an intended change with
MAILFILTER_REGEN_GOLDEN=1 and review the diff.
"""
import os
import shlex

import pytest

from mailfilter.rules import bundle as bundle_mod
from mailfilter.rules import compiler
from mailfilter.rules.format import MODE_ADDRESS, MODE_EXACT, MODE_HOST
from mailfilter.check import run_check
from mailfilter.policy.engine import Client, PolicyEngine

HERE = os.path.join(os.path.dirname(__file__), "golden")
CASES = sorted(d for d in os.listdir(HERE) if os.path.isdir(os.path.join(HERE, d)))
MODES = {"exact": MODE_EXACT, "address": MODE_ADDRESS, "host": MODE_HOST}


def _kv(tokens):
    out = {"rcpt": []}
    for tok in tokens:
        key, _, value = tok.partition("=")
        if key == "rcpt":
            out["rcpt"].append(value)
        else:
            out[key] = value
    return out


def answer(b, query: str) -> str:
    tokens = shlex.split(query)
    head = tokens[0]
    if head == "client":
        kv = _kv(tokens[2:])
        engine = PolicyEngine(b)
        session = engine.session(Client(ip=tokens[1], host=kv.get("host", "unknown")))
        rid = session.client_rule
        if rid < 0:
            return "none"
        ref = b.rule(rid)
        settings = ",".join(f'{k}="{v}"' for k, v in sorted(session.settings.items()))
        return f"{ref.where} {'allow' if ref.allow else 'deny'} {settings}".rstrip()
    if head == "envelope":
        kv = _kv(tokens[1:])
        report = run_check(b, ip=kv["ip"], host=kv.get("host", "unknown"), helo=kv.get("helo"),
                           sender=kv.get("from"), recipients=kv["rcpt"])
        return "\n" + "\n".join("    " + line for line in report.as_text().splitlines())
    name, mode = tokens[0], tokens[1]
    text = tokens[2] if len(tokens) > 2 else ""
    matcher = b.lists.get(name)
    if matcher is None:
        return "no such list"
    data = text.encode("latin-1")
    rid = matcher.first_fire(data) if b.dialect == "qregex" else matcher.last_match(data, MODES[mode])
    if rid < 0:
        return "none"
    ref = b.rule(rid)
    verdict = "exception" if ref.exception else ("negated" if ref.negated else "listed")
    return f"{ref.where} {ref.kind} {verdict}"


def render(case: str) -> str:
    root = os.path.join(HERE, case, "rules")
    compiled = compiler.compile_dir(root)
    b = bundle_mod.from_compiled(compiled)
    out = [f"# diagnostics ({len(compiled.diagnostics)})"]
    prefix = root + os.sep
    out += [str(d).replace(prefix, "rules/") for d in compiled.diagnostics]
    out.append("# lookups")
    with open(os.path.join(HERE, case, "queries")) as fh:
        for line in fh:
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            out.append(f"{line} -> {answer(b, line)}")
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("case", CASES)
def test_golden(case):
    got = render(case)
    path = os.path.join(HERE, case, "expected")
    if os.environ.get("MAILFILTER_REGEN_GOLDEN") == "1" or not os.path.exists(path):
        with open(path, "w") as fh:
            fh.write(got)
        if os.environ.get("MAILFILTER_REGEN_GOLDEN") != "1":
            pytest.fail(f"{path} did not exist; written, review it and re-run")
    with open(path) as fh:
        expected = fh.read()
    assert got == expected
