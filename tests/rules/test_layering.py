"""The server side never imports the compiler side (rules/format.py).

A fresh interpreter imports what a serving process imports (the bundle
loader, the policy engine, the SMTP protocol), loads a bundle file compiled
beforehand and runs a policy check whose verdict needs a regex, a wildmat, a
hash key and the tcp.smtp trie. Then none of the compile-only modules may be
loaded: the compiler, the control-file reader, the regex prefilters.

re2syntax is not in that list: loading a regex compiles it through
regexes.compile_re2, whose expansion check needs RE2's reading of the pattern
(a bundle with a pattern RE2 would abort on costs a 4xx, not the process);
test_regex_posix.py covers that check."""
import os
import subprocess
import sys
import textwrap

from mailfilter.rules import bundle, compiler

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPILE_SIDE = ("mailfilter.rules.compiler", "mailfilter.rules.controlfiles",
                "mailfilter.rules.prefilters")

CHILD = textwrap.dedent("""
    import sys

    from mailfilter.rules import bundle
    from mailfilter.policy.engine import Client, PolicyEngine, PolicyOptions
    import mailfilter.smtp.protocol  # noqa: F401  (the server's shell, imported as serving does)

    eng = PolicyEngine(bundle.load(sys.argv[1]), PolicyOptions())
    verdicts = []
    for ip, sender in (("192.0.2.7", "abc12345@any.example"), ("192.0.2.7", "x@spam.example"),
                       ("192.0.2.7", "joe@ok.example"), ("198.51.100.9", "joe@ok.example")):
        s = eng.session(Client(ip=ip, host="unknown"))
        s.helo("mx.sender.example")
        s.mail(sender)
        verdicts.append(s.rcpt("u@example.com").reason)
    print(" ".join(verdicts))
    print(" ".join(sorted(name for name in sys.modules if name.startswith("mailfilter."))))
""")


def test_serving_a_bundle_imports_nothing_from_the_compiler(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rcpthosts").write_text("example.com\n")
    (rules / "badmailfrom").write_text("/^[a-z]+[0-9]{5,}@/\n@spam.example\n*@never*.example\n")
    (rules / "tcp.smtp").write_text("198.51.100.:deny\n:allow\n")
    compiled = compiler.compile_dir(str(rules))
    assert compiled.diagnostics == []
    path = str(tmp_path / "rules.mfb")
    bundle.write(compiled, path)

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True,
                       env=env, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    verdict_line, modules_line = r.stdout.splitlines()
    # the regex, the @domain key, nothing, the denied client: matching really ran
    assert verdict_line.split() == ["badmailfrom", "badmailfrom", "ok", "client_denied"], verdict_line
    loaded = modules_line.split()
    assert "mailfilter.rules.bundle" in loaded and "mailfilter.rules.regexes" in loaded
    assert [m for m in COMPILE_SIDE if m in loaded] == []
