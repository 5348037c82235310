"""`mailfilter checkpassword` and `mailfilter cmd5checkpw`: DJB checkpassword tools.

Job: be the ``checkprogram`` of qmail-smtpd-auth, Dovecot's ``passdb
checkpassword``, qmail-popup, or mailfilter's own ``--checkpassword``:
read fd 3 to EOF (at most 512 bytes), decide, and on success exec the next
program (docs/behaviour/checkpassword.md#the-fd-3-interface); exit 1 for a wrong login, 2 for
misuse, 111 for a temporary problem (user database unreadable, chdir/setuid/exec failure).

checkpassword PROG [ARGS]   (DJB interface against the user database)
    fd 3: login NUL password NUL [timestamp NUL]; the timestamp is ignored, as
    in DJB's own program. The password is checked against the record's scrypt
    hash (mailfilter/auth/userdb.py); an unknown login is checked against a
    dummy record with the records' scrypt parameters first (the same cost, so
    no timing oracle for login names). On success: USER, HOME, SHELL (and
    MAILDIR when the record has one) are set, the working directory becomes
    HOME (when set), and -- when running as root and the record has uid/gid --
    supplementary groups, gid and uid are changed to the user's; then PROG is
    exec'ed. Records without uid/gid keep the caller's ids (virtual users),
    except root's: run as root, a record without a uid is refused (exit 111,
    a syslog line) unless ``--allow-root`` says PROG may run as root.

cmd5checkpw PROG [ARGS]     (docs/behaviour/checkpassword.md#mailfilter-cmd5checkpw: cmd5checkpw 0.30 compatible)
    With a challenge: CRAM-MD5 (RFC 2195) -- the response is verified from the
    user database's stored HMAC-MD5 states (core.cram_verify, constant-time),
    or, with ``--passwd FILE`` (poppasswd ``login:password``, clear text),
    from the clear password. Without a challenge: plain password compare
    (scrypt for the database, constant-time compare for the file). An unknown
    login goes through the same work against random secrets (dummy scrypt
    with the records' parameters, dummy CRAM states or password). Field
    order: ``djb`` (default; login NUL digest NUL challenge NUL, Hoffmann
    0.30 / jms1 / vchkpw) or ``dabrowski`` (login NUL challenge NUL digest
    NUL, cmd5checkpw 0.22) by ``--order`` or ``CMD5CHECKPW_ORDER``. No
    process state is changed before the exec
    (docs/behaviour/checkpassword.md#mailfilter-cmd5checkpw).

Both: the database is ``--db PATH``, else ``$MAILFILTER_USERDB``, else
var/users.db (relative to the working directory), opened read-only. Every
attempt is logged to syslog (mailfilter/auth/syslog.py: ident = tool name,
LOG_PID, facility authpriv unless MAILFILTER_SYSLOG_FACILITY says mail):
result, mechanism, user, TCPREMOTEIP, TCPLOCALPORT, reason -- never the
password, digest or challenge.
"""
from __future__ import annotations

import argparse
import hmac
import os
import sys

from mailfilter.auth.syslog import SyslogWriter

__all__ = ["checkpassword_main", "cmd5checkpw_main", "read_fd3", "split_fields"]

FD3_LIMIT = 512
EXIT_FAIL, EXIT_MISUSE, EXIT_TEMP = 1, 2, 111


class _Misuse(Exception):
    pass


def read_fd3(limit: int = FD3_LIMIT, fd: int = 3) -> bytes:
    """All of fd 3 (then closed); more than `limit` bytes or no fd 3 is misuse."""
    chunks, total = [], 0
    try:
        while True:
            b = os.read(fd, limit + 1 - total)
            if not b:
                break
            chunks.append(b)
            total += len(b)
            if total > limit:
                raise _Misuse(f"more than {limit} bytes on fd 3")
    except OSError as exc:
        raise _Misuse(f"cannot read fd 3: {exc.strerror}") from None
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    return b"".join(chunks)


def split_fields(data: bytes) -> tuple[bytes, bytes, bytes]:
    """login, second, third: each NUL-terminated; a missing third field is b""."""
    parts = data.split(b"\0")
    if len(parts) < 3:            # login and second field must both be terminated
        raise _Misuse("fd 3 needs login NUL password NUL")
    return parts[0], parts[1], parts[2] if len(parts) > 3 else b""


_EPILOG = {
    "checkpassword": "fd 3: login NUL password NUL [timestamp NUL], at most 512 bytes (the "
                     "timestamp is ignored).\n"
                     "on success: USER, HOME, SHELL (and MAILDIR) are set, the directory becomes "
                     "HOME, and as root the record's gid/uid are taken; then PROG runs.",
    "cmd5checkpw": "fd 3, at most 512 bytes: login NUL digest NUL challenge NUL (CRAM-MD5, order "
                   "djb) or login NUL challenge NUL digest NUL (order dabrowski); login NUL "
                   "password NUL NUL (empty third field): a plain password.\n"
                   "on success PROG runs, nothing else is changed.",
}
_EXITS = ("exit codes: 0 PROG ran and exited 0 (it replaces this process), 1 wrong login, "
          "2 misuse (no PROG, bad fd 3), 111 temporary trouble (user database unreadable, "
          "cannot become the user, PROG cannot run, a root run refused). every attempt is "
          "logged to syslog (facility authpriv, or mail with MAILFILTER_SYSLOG_FACILITY=mail); "
          "never a password.")


def _parser(prog: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"mailfilter {prog}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=_EPILOG[prog] + "\n" + _EXITS)
    p.add_argument("--db", help="user database, opened read-only (default $MAILFILTER_USERDB, "
                                "else var/users.db relative to the working directory)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="PROG [ARGS]: run on success")
    return p


def _db_path(args) -> str:
    from mailfilter.auth.userdb import DEFAULT_PATH
    return args.db or os.environ.get("MAILFILTER_USERDB") or DEFAULT_PATH


def _name(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


class _Tool:
    def __init__(self, ident: str):
        self.log = SyslogWriter(ident)     # connected after fd 3 is read (it could take fd 3)
        self.ip = os.environ.get("TCPREMOTEIP")
        self.port = os.environ.get("TCPLOCALPORT")

    def note(self, result: str, mech: str, user: str | None, reason: str | None = None) -> None:
        self.log.attempt(result, mech, user, self.ip, reason, self.port)

    def exec_next(self, command: list[str], mech: str, user: str) -> int:
        self.note("success", mech, user)
        try:
            os.execvp(command[0], command)
        except OSError as exc:
            self.note("error", mech, user, f"cannot run {command[0]}: {exc.strerror}")
            return EXIT_TEMP
        return EXIT_TEMP  # pragma: no cover - execvp does not return


def _start(ident: str, doc: str, argv: list[str] | None, extra=None):
    """Parse argv, then read fd 3 BEFORE opening anything (a socket or the
    database would otherwise be handed fd 3 when the caller passed none);
    then open the syslog socket (openlog LOG_NDELAY: before any setuid)."""
    p = _parser(ident, doc)
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)          # argparse errors exit 2 = misuse
    tool = _Tool(ident)
    if not args.command:
        print(f"mailfilter {ident}: usage: mailfilter {ident} PROG [ARGS]", file=sys.stderr)
        return args, tool, None, None
    try:
        fields: tuple | _Misuse = split_fields(read_fd3())
    except _Misuse as exc:
        fields = exc
    tool.log.connect()
    return args, tool, args.command, fields


def checkpassword_main(argv: list[str] | None = None) -> int:
    from mailfilter.auth.userdb import UserDB, UserDBUnavailable

    mech = "PLAIN/LOGIN"
    args, tool, command, fields = _start("checkpassword", "DJB checkpassword against the user database",
                                         argv, _checkpassword_options)
    if command is None:
        return EXIT_MISUSE
    if isinstance(fields, _Misuse):
        tool.note("error", mech, None, str(fields))
        return EXIT_MISUSE
    login, password, _timestamp = fields
    user = _name(login)
    if not login or not password:
        tool.note("fail", mech, user, "empty login or password")
        return EXIT_FAIL
    try:
        with UserDB(_db_path(args), readonly=True) as db:
            rec = db.get(user)
            # an unknown user costs the same scrypt: no timing oracle for names
            check = rec if rec is not None else db.dummy_user()
    except UserDBUnavailable:
        tool.note("error", mech, user, "user database unreadable")
        return EXIT_TEMP
    if not check.check_password(password) or rec is None:
        tool.note("fail", mech, user, "unknown user" if rec is None else "bad password")
        return EXIT_FAIL
    if os.geteuid() == 0 and rec.uid is None and not args.allow_root:
        # a virtual user keeps the caller's ids; for root that would run PROG
        # as root on a password alone (docs/behaviour/checkpassword.md)
        tool.note("error", mech, user, "refusing to run the next program as root: the user has "
                                       "no uid (--allow-root allows it)")
        return EXIT_TEMP
    # DJB: set $USER $HOME $SHELL, groups, gid, uid, cwd, then run prog.
    os.environ["USER"] = rec.name
    os.environ["SHELL"] = rec.shell or "/usr/sbin/nologin"
    if rec.home:
        os.environ["HOME"] = rec.home
    if rec.maildir:
        os.environ["MAILDIR"] = rec.maildir
    try:
        if os.geteuid() == 0 and rec.uid is not None:
            gid = rec.gid if rec.gid is not None else rec.uid
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(rec.uid)
        if rec.home:
            os.chdir(rec.home)
    except OSError as exc:
        tool.note("error", mech, user, f"cannot become the user: {exc.strerror}")
        return EXIT_TEMP
    return tool.exec_next(command, mech, user)


def _checkpassword_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-root", action="store_true",
                   help="run as root, let PROG run as root for a user without a uid "
                        "(default: refused, exit 111)")


def _cmd5_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--passwd", metavar="FILE", help="poppasswd file login:password (clear text) "
                                                    "instead of the user database")
    p.add_argument("--order", choices=("djb", "dabrowski"),
                   help="CRAM-MD5 field order (default $CMD5CHECKPW_ORDER or djb)")


def cmd5checkpw_main(argv: list[str] | None = None) -> int:
    from mailfilter.core import core
    from mailfilter.auth.userdb import User, UserDB, UserDBUnavailable, lookup_poppasswd

    args, tool, command, fields = _start("cmd5checkpw", "cmd5checkpw: CRAM-MD5 or plain, DJB interface",
                                         argv, _cmd5_options)
    if command is None:
        return EXIT_MISUSE
    order = args.order or os.environ.get("CMD5CHECKPW_ORDER", "djb").lower()
    if order not in ("djb", "dabrowski"):
        tool.note("error", "-", None, "CMD5CHECKPW_ORDER must be djb or dabrowski")
        return EXIT_MISUSE
    if isinstance(fields, _Misuse):
        tool.note("error", "-", None, str(fields))
        return EXIT_MISUSE
    login, f2, f3 = fields
    # docs/behaviour/checkpassword.md#field-orders: empty third field -> plain; else CRAM in
    # the chosen order.
    if not f3:
        mech, secret, challenge = "PLAIN/LOGIN", f2, b""
    elif order == "djb":
        mech, secret, challenge = "CRAM-MD5", f2, f3
    else:
        mech, secret, challenge = "CRAM-MD5", f3, f2
    user = _name(login)
    if not login or not secret:
        tool.note("fail", mech, user, "empty login or password")
        return EXIT_FAIL
    # An unknown user (or one without a CRAM-MD5 secret) is checked against
    # random secrets of the same shape, then fails: the same work either way,
    # so the time of a failure does not tell which names exist.
    try:
        if args.passwd:
            clear = lookup_poppasswd(args.passwd, user)
            pw = os.urandom(16).hex().encode() if clear is None else \
                clear.encode("utf-8", "surrogateescape")
            if challenge:
                ok = core.cram_verify(core.cram_states(pw), challenge, secret)
            else:
                ok = hmac.compare_digest(pw, secret)
            ok = ok and clear is not None
            reason = "unknown user" if clear is None else ("bad digest" if challenge else "bad password")
        else:
            with UserDB(_db_path(args), readonly=True) as db:
                rec = db.get(user)
                if challenge:
                    check = rec if rec is not None and rec.cram is not None else \
                        User("", os.urandom(32), "")
                else:
                    check = rec if rec is not None else db.dummy_user()
            if challenge:
                ok = check.check_cram(challenge, secret) and check is rec
                reason = ("unknown user" if rec is None else
                          "bad digest" if rec.cram is not None else "no CRAM-MD5 secret")
            else:
                ok = check.check_password(secret) and check is rec
                reason = "unknown user" if rec is None else "bad password"
    except (OSError, UserDBUnavailable):
        tool.note("error", mech, user, "password file unreadable")
        return EXIT_TEMP
    if not ok:
        tool.note("fail", mech, user, reason)
        return EXIT_FAIL
    return tool.exec_next(command, mech, user)


def _entry(fn) -> None:
    sys.exit(fn(sys.argv[1:]))


def checkpassword_entry() -> None:
    """Console script `mailfilter-checkpassword`."""
    _entry(checkpassword_main)


def cmd5checkpw_entry() -> None:
    """Console script `mailfilter-cmd5checkpw`."""
    _entry(cmd5checkpw_main)
