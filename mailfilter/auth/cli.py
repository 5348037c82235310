"""`mailfilter passwd add|set|del|list|import|export`: manage the user database.

Job: the operator's door to mailfilter/auth/userdb.py. Passwords are read
without echo (getpass, asked twice on a terminal) or, with ``--stdin``, as
one line from standard input; they are never taken from the command line
(argv is visible to every local user) and never printed.

    passwd [--db PATH] add USER [--stdin] [--home H] [--uid N] [--gid N]
                                [--maildir M] [--shell S] [--no-cram]
    passwd [--db PATH] set USER [--stdin | --keep-password] [same attributes]
    passwd [--db PATH] del USER
    passwd [--db PATH] list
    passwd [--db PATH] import FILE [--records] [--no-replace]   (FILE "-" = stdin)
    passwd [--db PATH] export [-o FILE]

``import FILE`` reads a cmd5checkpw/poppasswd file (``login:password`` in
clear text, ``#`` comments and blank lines allowed,
docs/behaviour/auth.md#user-database) and upserts every user in ONE transaction: any bad line is
reported as ``FILE:LINE: problem`` and nothing at all is imported (exit 1).
It says how many users were added and how many existing ones got the new
password; ``--no-replace`` leaves existing users as they are. ``export`` writes the
records -- CRAM states and scrypt hashes, never a clear password (there is
none) -- as ``# mailfilter-userdb-export v1`` followed by one JSON object per
user; ``import --records`` reads that back (moving a database between
hosts). An export can answer CRAM-MD5 challenges: it is written mode 0600,
also over an existing file (a temporary 0600 file renamed over it).

Without ``--stdin`` the password is asked on the terminal (/dev/tty);
with no terminal at all it is read as one line from standard input, as
``--stdin`` does (no getpass warning).

Exit codes: 0 ok, 1 refused (bad import, unknown/existing user), 2 usage or
database error.
"""
from __future__ import annotations

import argparse
import getpass
import os
import sys
import warnings

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    from mailfilter.auth.userdb import DEFAULT_PATH

    p = sub.add_parser("passwd", help="manage the SMTP AUTH user database",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="passwords are never taken from the command line: they are asked on the "
                              "terminal (twice), or read as one line from stdin with --stdin or when "
                              "there is no terminal.\n"
                              "exit codes: 0 ok, 1 refused (bad import line, unknown or existing "
                              "user), 2 usage or database error")
    p.add_argument("--db", default=None, help=f"database file (default $MAILFILTER_USERDB, else {DEFAULT_PATH} "
                                                  "relative to the working directory)")
    p.add_argument("--cost", type=int, default=None,
                   help="scrypt cost as log2(N) for new hashes (default 14)")
    ps = p.add_subparsers(dest="passwd_command", required=True)

    def attrs(q):
        q.add_argument("--home", help="home directory (checkpassword: HOME, chdir)")
        q.add_argument("--uid", type=int, help="uid to run as (checkpassword run as root)")
        q.add_argument("--gid", type=int, help="gid to run as")
        q.add_argument("--maildir", help="mail directory (checkpassword: MAILDIR)")
        q.add_argument("--shell", help="SHELL for the next program")
        q.add_argument("--stdin", action="store_true", help="read the password as one line from stdin")
        q.add_argument("--no-cram", action="store_true",
                       help="store no CRAM-MD5 secret: this user can only use PLAIN/LOGIN")

    a = ps.add_parser("add", help="add a user")
    a.add_argument("user")
    attrs(a)
    s = ps.add_parser("set", help="change a user's password and/or attributes")
    s.add_argument("user")
    attrs(s)
    s.add_argument("--keep-password", action="store_true", help="change attributes only")
    d = ps.add_parser("del", help="delete a user")
    d.add_argument("user")
    ps.add_parser("list", help="list users (no secrets)")
    i = ps.add_parser("import", help="import a poppasswd file (login:password), all or nothing")
    i.add_argument("file")
    i.add_argument("--records", action="store_true", help="FILE is a `passwd export` file")
    i.add_argument("--no-replace", action="store_true",
                   help="leave users that exist as they are (default: they get the file's password)")
    e = ps.add_parser("export", help="export the records (hashes, never clear passwords)")
    e.add_argument("-o", "--output", default="-")
    p.set_defaults(func=cmd_passwd)


def _stdin_line() -> bytes:
    return sys.stdin.buffer.readline().rstrip(b"\n").rstrip(b"\r")


def _read_password(args) -> bytes:
    if args.stdin:
        pw = _stdin_line()
    else:
        try:
            with warnings.catch_warnings():
                # no terminal: getpass would warn and echo; read stdin as --stdin does
                warnings.simplefilter("error", getpass.GetPassWarning)
                first = getpass.getpass("Password: ")
                if getpass.getpass("Again: ") != first:
                    raise ValueError("passwords differ")
            pw = first.encode("utf-8")
        except getpass.GetPassWarning:
            pw = _stdin_line()
    if not pw:
        raise ValueError("empty password")
    return pw


def _attrs(args) -> dict:
    out = {}
    for k in ("home", "uid", "gid", "maildir", "shell"):
        v = getattr(args, k, None)
        if v is not None:
            out[k] = v
    return out


def _write_private(path: str, text: str) -> None:
    """Write `text` to `path` readable by the owner only (0600), whatever the
    mode of a file already there: a regular file (or a new one) is replaced by
    a temporary file created 0600 in the same directory and renamed over it,
    so no reader can open it while it is still group- or world-readable.
    A non-regular target (a FIFO, /dev/stdout) is written in place."""
    import stat
    import tempfile

    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        return
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".export.")   # 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def cmd_passwd(args) -> int:
    from mailfilter.auth.userdb import (
        DEFAULT_PATH, PoppasswdError, UserDB, UserDBError, UserDBUnavailable,
        parse_poppasswd, parse_records)

    path = args.db or os.environ.get("MAILFILTER_USERDB") or DEFAULT_PATH
    kw = {} if args.cost is None else {"scrypt_n": 1 << args.cost}
    cmd = args.passwd_command
    try:
        db = UserDB(path, readonly=cmd in ("list", "export"), **kw)
    except UserDBUnavailable as exc:
        print(f"mailfilter passwd: {exc}", file=sys.stderr)
        return 2
    try:
        if cmd == "add":
            if db.get(args.user) is not None:      # before asking a password for nothing
                raise UserDBError(f"user {args.user!r} exists (`passwd set` changes it)")
            pw = _read_password(args)
            db.add(db.make_user(args.user, pw, cram=not args.no_cram, **_attrs(args)))
            print(f"added {args.user}")
        elif cmd == "set":
            if db.get(args.user) is None:
                raise UserDBError(f"no such user {args.user!r}")
            fields = _attrs(args)
            if not args.keep_password:
                u = db.make_user(args.user, _read_password(args), cram=not args.no_cram)
                fields.update(cram=u.cram, hash=u.hash)
            elif args.no_cram:
                fields["cram"] = None
            if fields:
                db.update(args.user, **fields)
            print(f"updated {args.user}")
        elif cmd == "del":
            db.delete(args.user)
            print(f"deleted {args.user}")
        elif cmd == "list":
            for u in db.users():
                print(f"{u.name}\tcram={'yes' if u.cram else 'no'}\tuid={'' if u.uid is None else u.uid}"
                      f"\tgid={'' if u.gid is None else u.gid}\thome={u.home}\tmaildir={u.maildir}")
        elif cmd == "import":
            name = "<stdin>" if args.file == "-" else args.file
            if args.file == "-":
                text = sys.stdin.read()
            else:
                with open(args.file, encoding="utf-8", errors="surrogateescape") as fh:
                    text = fh.read()
            if args.records:
                users = parse_records(text, name)
            else:
                users = [db.make_user(login, pw.encode("utf-8", "surrogateescape"))
                         for login, pw in parse_poppasswd(text, name)]
            # poppasswd: new users are added, existing ones get the new password
            # only (--no-replace: are left alone); --records replaces whole records
            added, replaced = db.put_many(users, replace=True, passwords_only=not args.records,
                                          keep_existing=args.no_replace)
            kept = len({u.name for u in users}) - added - replaced
            print(f"imported {name}: {added} user(s) added, {replaced} replaced"
                  + (f", {kept} existing left as they were" if args.no_replace else ""))
        elif cmd == "export":
            text = db.export_records()
            if args.output == "-":
                sys.stdout.write(text)
            else:
                _write_private(args.output, text)
                print(f"exported {text.count(chr(10)) - 1} user(s) to {args.output}", file=sys.stderr)
    except PoppasswdError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        print(f"mailfilter passwd: {len(exc.problems)} bad line(s), nothing imported", file=sys.stderr)
        return 1
    except UserDBUnavailable as exc:
        print(f"mailfilter passwd: {exc}", file=sys.stderr)
        return 2
    except (UserDBError, ValueError) as exc:
        print(f"mailfilter passwd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mailfilter passwd: {exc}", file=sys.stderr)
        return 2
    finally:
        db.close()
    return 0
