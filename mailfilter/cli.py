"""Command line: `mailfilter compile | check | serve | run | policyd | passwd | checkpassword | cmd5checkpw`
(also `python -m mailfilter`); `mailfilter --version` prints the version.

`run` is `serve` on the embedded defaults: rules/ compiled at start, listen
127.0.0.1:2525, deliver to maildir:var/spool.

Exit codes: compile 0 ok (ignored tcp.smtp settings warned about) / 1 lines
skipped / 2 error; check 0 every recipient accepted / 1 something rejected
/ 2 error or lines skipped; passwd
0 / 1 refused / 2 error (auth/cli.py); checkpassword and cmd5checkpw follow
the DJB interface: exec PROG on success, 1 bad login, 2 misuse, 111
temporary (auth/checkpassword.py). Those two take their arguments verbatim (PROG may
have options of its own), so main() hands them over before argparse.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from mailfilter import PRODUCT, __version__

DEFAULT_RULES = "rules"
DEFAULT_BUNDLE = os.path.join("var", "rules.mfb")


class Progress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.enabled = stream.isatty()
        self.last = 0.0

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        width = 30
        filled = width * done // max(total, 1)
        self.stream.write(f"\r{phase:<16} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _print_diagnostics(diags) -> None:
    for d in diags:
        print(d, file=sys.stderr)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_compile(args) -> int:
    from mailfilter.rules import bundle
    from mailfilter.rules import compiler
    from mailfilter.rules import controlfiles

    t0 = time.perf_counter()
    try:
        src = controlfiles.read_rules_dir(args.rules_dir)
        compiled = compiler.compile_source(src, progress=Progress())
        size = bundle.write(compiled, args.output)
    except (OSError, ValueError) as exc:
        print(f"mailfilter compile: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    _print_diagnostics(compiled.diagnostics)
    print(f"compiled {args.rules_dir} -> {args.output} "
          f"(dialect {compiled.meta['dialect']}, {compiled.n_rules} rules, "
          f"{_human(size)}, {elapsed:.2f} s)")
    for kind, count in sorted(compiled.counts.items()):
        if count:
            print(f"  {kind:<12} {count}")
    skipped = sum(1 for d in compiled.diagnostics if not d.kept)
    ignored = len(compiled.diagnostics) - skipped
    if ignored:
        print(f"{ignored} setting(s) ignored", file=sys.stderr)
    if skipped:
        print(f"{skipped} line(s) skipped", file=sys.stderr)
        return 1
    return 0


def _load_for_check(args):
    from mailfilter.rules import bundle
    from mailfilter.rules import compiler

    if args.bundle:
        return bundle.load(args.bundle), []
    compiled = compiler.compile_dir(args.rules)
    return bundle.from_compiled(compiled), compiled.diagnostics


def _ip_address(text: str) -> str:
    """argparse type for --ip: an IPv4 or IPv6 address literal, as the server sees one."""
    from mailfilter.policy.engine import pack_ip

    if pack_ip(text) is None:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}")
    return text


def cmd_check(args) -> int:
    from mailfilter.rules.bundle import BundleError
    from mailfilter.check import run_check
    from mailfilter.serve.config import StartupError, options_from

    for flag, values in (("--helo", [args.helo]), ("--from", [args.sender]), ("--rcpt", args.rcpt)):
        for value in values:
            if value is not None and any(c in value for c in "\r\n"):
                # each becomes one command line: a line end would make it two
                print(f"mailfilter check: {flag} {value!r}: CR and LF cannot be part of "
                      "an SMTP command", file=sys.stderr)
                return 2
    try:
        # the server's settings that change its answers: --config, then the flags
        server = options_from(argparse.Namespace(
            config=args.config, auth=args.auth, hostname=args.hostname, open_relay=args.open_relay,
            deny=args.deny, allow_untrusted_routing=args.allow_untrusted_routing,
            no_smtputf8=args.no_smtputf8))
    except StartupError as exc:
        print(f"mailfilter check: {exc}", file=sys.stderr)
        return 2
    try:
        loaded, diags = _load_for_check(args)
    except (OSError, ValueError, BundleError) as exc:
        print(f"mailfilter check: {exc}", file=sys.stderr)
        return 2
    _print_diagnostics(diags)
    resolver = None
    if args.dns is not None:
        from mailfilter.policy.dns import Resolver
        try:
            resolver = Resolver(args.dns or None)
        except ValueError as exc:
            print(f"mailfilter check: --dns {exc}", file=sys.stderr)
            return 2
    report = run_check(loaded, ip=args.ip, host=args.host, helo=args.helo,
                       sender=args.sender, recipients=args.rcpt,
                       open_relay=server.open_relay, auth_user=args.auth_user, resolver=resolver,
                       auth_mode=server.auth, hostname=server.hostname, tls=args.tls,
                       deny=server.deny, allow_routing=server.allow_untrusted_routing,
                       smtputf8=not server.no_smtputf8)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.as_text())
    if any(not d.kept for d in diags):     # the answers above are without those lines
        return 2
    return 0 if report.all_accepted else 1


def cmd_serve(args) -> int:
    from mailfilter.serve.config import StartupError, options_from
    from mailfilter.serve.supervise import run

    try:
        opts = options_from(args)
    except StartupError as exc:
        print(f"mailfilter serve: {exc}", file=sys.stderr)
        return 2
    return run(opts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailfilter", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"{PRODUCT} {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a rules directory into a bundle",
                       epilog="paths are relative to the working directory. exit codes: 0 compiled "
                              "(ignored tcp.smtp settings are warned about), 1 compiled but some "
                              "lines were skipped (each named FILE:LINE on stderr), 2 nothing "
                              "written (unreadable directory, bad setting, cannot write OUTPUT)")
    c.add_argument("rules_dir", nargs="?", default=DEFAULT_RULES, metavar="RULES_DIR",
                   help=f"spamcontrol control files and tcp.smtp (default: {DEFAULT_RULES})")
    c.add_argument("-o", "--output", default=DEFAULT_BUNDLE, metavar="FILE",
                   help=f"the bundle to write (default: {DEFAULT_BUNDLE})")
    c.set_defaults(func=cmd_compile)

    k = sub.add_parser("check", help="what the server would answer to an envelope",
                       epilog="exit codes: 0 every recipient accepted, 1 something refused (the "
                              "report says what and which rule), 2 usage error, unreadable "
                              "rules/bundle, or rule lines skipped")
    src = k.add_mutually_exclusive_group(required=True)
    src.add_argument("--rules", help="rules directory (compiled in memory)")
    src.add_argument("--bundle", help="compiled bundle file")
    k.add_argument("--ip", default="127.0.0.1", type=_ip_address,
                   help="client IP address (default: 127.0.0.1)")
    k.add_argument("--host", default="unknown",
                   help="client host name (TCPREMOTEHOST; default: unknown)")
    k.add_argument("--helo", default=None, help="HELO/EHLO name (omit: no HELO sent)")
    k.add_argument("--from", dest="sender", default=None, help="envelope sender ('' for <>)")
    k.add_argument("--rcpt", action="append", default=[], help="envelope recipient (repeatable)")
    k.add_argument("--auth-user", default=None, help="pretend the session authenticated as USER")
    k.add_argument("--open-relay", action="store_true", help="allow relaying without rcpthosts (docs/behaviour/control-files.md#rcpthosts)")
    k.add_argument("--auth", metavar="MODE", help="the server's --auth (every client's default SMTPAUTH)")
    k.add_argument("--hostname", help="the server's --hostname (name in the greeting)")
    k.add_argument("--allow-untrusted-routing", action="store_true", default=None,
                   help="the server's --allow-untrusted-routing")
    k.add_argument("--deny", choices=("close", "rcpt"),
                   help="the server's --deny: what a tcp.smtp deny client gets (default: close)")
    k.add_argument("--no-smtputf8", action="store_true", default=None,
                   help="the server's --no-smtputf8: SMTPUTF8 not offered, so an 8-bit address "
                        "is refused (otherwise MAIL announces SMTPUTF8 when an address needs it)")
    k.add_argument("--config", help="the server's TOML file: its open_relay, auth, hostname, "
                                    "deny, allow_untrusted_routing and no_smtputf8 apply")
    k.add_argument("--dns", nargs="?", const="", default=None, metavar="HOST:PORT",
                   help="perform the HELOCHECK A/M and MFDNSCHECK lookups the server would "
                        "(system resolver, or the one given)")
    k.add_argument("--tls", action="store_true",
                   help="a session inside TLS (after STARTTLS, or on --listen-tls): the CONNECT "
                        "line names what it is offered (EHLO keywords, AUTH mechanisms)")
    k.add_argument("--json", action="store_true", help="machine-readable output")
    k.set_defaults(func=cmd_check)

    from mailfilter.serve.config import add_arguments

    serve_epilog = ("relative paths (rules, var/...) are taken from the working directory. "
                    "exit codes: 0 stopped cleanly (SIGTERM/SIGINT), 2 could not start (a bad "
                    "option or TOML key, unreadable rules, a port in use, a certificate or "
                    "descriptor problem: one line on stderr says which). SIGHUP reloads the "
                    "rules and certificates.")
    s = sub.add_parser("serve", help="run the SMTP server", epilog=serve_epilog)
    add_arguments(s)
    s.set_defaults(func=cmd_serve)
    r = sub.add_parser("run", help="what `make run` starts: serve on the embedded defaults",
                       epilog=serve_epilog)
    add_arguments(r)
    r.set_defaults(func=cmd_serve)

    from mailfilter.serve.policyd import add_parser as add_policyd

    add_policyd(sub)

    from mailfilter.auth.cli import add_parser as add_passwd

    add_passwd(sub)
    for name, text in (("checkpassword", "DJB checkpassword against the user database"),
                       ("cmd5checkpw", "cmd5checkpw: CRAM-MD5 or plain, user database or poppasswd")):
        t = sub.add_parser(name, help=text, add_help=False)
        t.add_argument("args", nargs=argparse.REMAINDER)
    return p


_TOOLS = {"checkpassword": "checkpassword_main", "cmd5checkpw": "cmd5checkpw_main"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _TOOLS:     # DJB tools: no argparse of ours in front
        from mailfilter.auth import checkpassword as checkpw
        return getattr(checkpw, _TOOLS[argv[0]])(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
