"""`mailfilter serve`'s TLS configuration as a real process: the embedded
certificate under var/tls/ of the working directory, the start-up log, the
start-up errors (exit 2, one line naming the file or option), the
--listen-tls listeners, and SIGHUP with a bad new certificate. Each server
runs in the test's own directory (its var/tls/ is the test's)."""
from __future__ import annotations

import os
import re
import signal
import socket

import pytest

from tests.support.certs import mismatched_pair, write_pair
from tests.support.server_harness import free_port, run_cli, spawn_serve, write_rules

FP = r"(?:[0-9A-F]{2}:){31}[0-9A-F]{2}"


@pytest.fixture
def rules(tmp_path):
    return write_rules(tmp_path / "rules")


@pytest.fixture
def served(tmp_path, rules):
    procs = []

    def _spawn(*args, **kw):
        kw.setdefault("cwd", tmp_path)
        sp = spawn_serve("--rules", rules, "--deliver", f"maildir:{tmp_path}/spool",
                         *map(str, args), **kw)
        procs.append(sp)
        return sp

    yield _spawn
    for sp in procs:
        sp.stop()


def serve_error(tmp_path, rules, *args) -> str:
    """The one line a refused start prints (exit 2, no traceback)."""
    r = run_cli("serve", "--rules", rules, "--deliver", f"maildir:{tmp_path}/spool",
                "--remote-host", "off", *map(str, args), cwd=tmp_path)
    errors = [line for line in r.stderr.splitlines() if line.startswith("mailfilter serve: ")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    return errors[0].removeprefix("mailfilter serve: ")


def test_embedded_certificate_made_on_first_start_then_reused(served, tmp_path):
    """No --tls-cert: a self-signed certificate for the rules' `me` under
    var/tls/ of the working directory, said in one line with its path and
    fingerprint; the next start reuses it; another --hostname makes a new one."""
    sp = served()
    [m] = sp.log.wait_for(r"TLS: made a self-signed certificate \(none yet\) for mx\.test: "
                          rf"var/tls/cert\.pem: CN=mx\.test .*, ECDSA P-256, .*SHA-256 ({FP})$")
    assert sorted(os.listdir(tmp_path / "var" / "tls")) == [".lock", "cert.pem", "key.pem"]
    assert oct(os.stat(tmp_path / "var" / "tls" / "key.pem").st_mode & 0o777) == "0o600"
    assert "TLS on: TLSv1.2 or later, handshake timeout 30 s" in sp.log.text()
    assert re.search(rf"listening on 127\.0\.0\.1:{sp.port} \(pid \d+, \w+ loop, STARTTLS\)",
                     sp.log.text())
    sp.stop()
    again = served()
    [m2] = again.log.wait_for(rf"TLS: using the self-signed certificate for mx\.test: "
                              rf"var/tls/cert\.pem: .*SHA-256 ({FP})$")
    assert m2.group(1) == m.group(1)
    again.stop()
    other = served("--hostname", "mail.other.test")
    [m3] = other.log.wait_for(r"TLS: made a self-signed certificate \(the old one was for mx\.test\) "
                              rf"for mail\.other\.test: var/tls/cert\.pem: .*SHA-256 ({FP})$")
    assert m3.group(1) != m.group(1)


def test_no_tls(served, tmp_path):
    sp = served("--no-tls")
    sp.log.wait_for(r"TLS off \(--no-tls\): STARTTLS not offered")
    assert re.search(rf"listening on 127\.0\.0\.1:{sp.port} \(pid \d+, \w+ loop, no TLS\)",
                     sp.log.text())
    assert not (tmp_path / "var").exists()


def test_operator_pairs_logged_with_subject_type_and_expiry(served, tmp_path):
    ec, rsa = write_pair(tmp_path / "certs", kind="ecdsa"), write_pair(tmp_path / "certs", kind="rsa")
    sp = served("--tls-cert", ec.cert, "--tls-key", ec.key, "--tls-cert", rsa.cert,
                "--tls-key", rsa.key, "--require-tls", "--tls-min-version", "TLSv1.3")
    text = sp.log.text()
    for pair, kind in ((ec, "ECDSA P-256"), (rsa, "RSA-2048")):
        expiry = f"{pair.certificate.not_valid_after_utc:%Y-%m-%d %H:%M}"
        assert (f"TLS certificate {pair.cert}: CN=mx.test (DNS mx.test), {kind}, valid until "
                f"{expiry} UTC, SHA-256 {pair.fingerprint}") in text
    assert "TLS on: TLSv1.3 or later, handshake timeout 30 s, required before MAIL (--require-tls)" in text
    assert not (tmp_path / "var").exists()          # no embedded certificate when pairs are given


def test_listen_tls_listeners(served, tmp_path):
    """--listen-tls: its own listener, logged as implicit TLS (the handshake
    itself is the SMTP side's: tests/smtp)."""
    implicit = free_port()
    sp = served("--listen-tls", f"127.0.0.1:{implicit}")
    sp.log.wait_for(rf"listening on 127\.0\.0\.1:{implicit} \(pid \d+, \w+ loop, implicit TLS\)")
    assert re.search(rf"listening on 127\.0\.0\.1:{sp.port} \(pid \d+, \w+ loop, STARTTLS\)",
                     sp.log.text())
    with socket.create_connection(("127.0.0.1", implicit), timeout=10):
        pass                                        # the port accepts


def test_warnings_at_start(served, tmp_path):
    old = write_pair(tmp_path / "certs", expired=True)
    sp = served("--tls-cert", old.cert, "--tls-key", old.key, "--tls-allow-expired",
                "--auth-plaintext")
    text = sp.log.text()
    assert re.search(rf"WARNING TLS certificate {re.escape(str(old.cert))}: the certificate expired "
                     r"on [-0-9: ]+ UTC; serving it anyway \(--tls-allow-expired\)", text)
    assert ("WARNING --auth-plaintext: AUTH PLAIN and LOGIN are accepted before TLS: "
            "passwords can cross the network in clear") in text


def test_start_up_errors_name_the_file(tmp_path, rules):
    good = write_pair(tmp_path / "certs")
    bad = mismatched_pair(tmp_path / "certs")
    old = write_pair(tmp_path / "certs", name="old", expired=True)
    port = str(free_port())
    base = ("--listen", f"127.0.0.1:{port}")
    assert serve_error(tmp_path, rules, *base, "--tls-cert", tmp_path / "nope.pem",
                       "--tls-key", good.key) == \
        f"--tls-cert {tmp_path / 'nope.pem'}: cannot read it: No such file or directory"
    assert serve_error(tmp_path, rules, *base, "--tls-cert", bad.cert, "--tls-key", bad.key) == \
        f"--tls-key {bad.key}: does not match the certificate in {bad.cert}"
    assert serve_error(tmp_path, rules, *base, "--tls-cert", old.cert, "--tls-key", old.key) \
        .startswith(f"--tls-cert {old.cert}: the certificate expired on ")
    assert serve_error(tmp_path, rules, *base, "--tls-cert", good.key, "--tls-key", good.cert) == \
        (f"--tls-cert {good.key}: not a PEM certificate (it holds a private key: "
         "--tls-cert and --tls-key swapped?)")
    assert serve_error(tmp_path, rules, *base, "--tls-cert", good.cert) == \
        "--tls-cert and --tls-key pair in order: 1 --tls-cert and 0 --tls-key given"
    assert serve_error(tmp_path, rules, *base, "--no-tls", "--listen-tls", "127.0.0.1:0") == \
        "--no-tls and --listen-tls: one turns TLS off, the other needs it"
    (tmp_path / "var").write_text("")               # the embedded certificate has nowhere to go
    assert serve_error(tmp_path, rules, *base) == "embedded certificate var/tls: Not a directory"


def test_next_hop_tls_options(tmp_path, rules):
    """--next-hop-tls-verify / --next-hop-tls-ca go to smtp:/lmtp: next
    hops; a maildir: takes none (a start-up error), and a CA file that is
    not one is named at start."""
    base = ("--listen", f"127.0.0.1:{free_port()}")
    for args in (["--next-hop-tls-verify"], ["--next-hop-tls-ca", str(write_ca(tmp_path))]):
        assert serve_error(tmp_path, rules, *base, *args).startswith(
            "--deliver: option tls_verify is for smtp: and lmtp: next hops")
    missing = tmp_path / "none.pem"
    assert serve_error(tmp_path, rules, *base, "--deliver", "smtp:127.0.0.1:2",
                       "--next-hop-tls-ca", missing) == \
        f"--next-hop-tls-ca {missing}: cannot read it: No such file or directory"
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    assert serve_error(tmp_path, rules, *base, "--deliver", "smtp:127.0.0.1:2",
                       "--next-hop-tls-ca", junk) == f"--next-hop-tls-ca {junk}: not a PEM certificate"


def write_ca(tmp_path):
    from tests.support.certs import make_ca
    return make_ca(tmp_path / "ca").cert


@pytest.mark.parametrize("workers", [1, 2])
def test_a_taken_listen_tls_port_is_a_start_up_error(tmp_path, rules, workers):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert serve_error(tmp_path, rules, "--listen", f"127.0.0.1:{free_port()}",
                           "--listen-tls", f"127.0.0.1:{port}", "--workers", str(workers)) == \
            f"--listen-tls 127.0.0.1:{port}: Address already in use"


def test_sighup_with_a_bad_new_certificate_keeps_the_old(served, tmp_path):
    """SIGHUP reads the certificates again with the rules; a pair that
    cannot be served is logged and the running one kept (the server goes
    on serving: the rules' reload is not held back either)."""
    pair = write_pair(tmp_path / "certs")
    sp = served("--tls-cert", pair.cert, "--tls-key", pair.key)
    pair.cert.write_text("not a certificate any more\n")
    sp.signal(signal.SIGHUP)
    sp.log.wait_for(rf"ERROR TLS reload refused: {re.escape(str(pair.cert))}: not a PEM certificate$")
    sp.log.wait_for(r"reload ok: \d+ rules from ")
    assert sp.proc.poll() is None
    with socket.create_connection(("127.0.0.1", sp.port), timeout=10) as s:
        s.settimeout(10)
        assert s.recv(512).startswith(b"220 ")
    write_pair(tmp_path / "certs")                    # a good new pair in the same files,
    os.replace(write_pair(tmp_path / "other").key, pair.key)    # then the key of another one
    sp.signal(signal.SIGHUP)
    sp.log.wait_for(rf"ERROR TLS reload refused: {re.escape(str(pair.key))}: does not match "
                    rf"the certificate in {re.escape(str(pair.cert))}$")


def test_sighup_swaps_in_a_new_certificate(served, tmp_path):
    """A good new pair in the same files: read on SIGHUP, logged, swapped
    in for new sessions."""
    pair = write_pair(tmp_path / "certs", kind="rsa")
    sp = served("--tls-cert", pair.cert, "--tls-key", pair.key)
    assert f"SHA-256 {pair.fingerprint}" in sp.log.text()
    new = write_pair(tmp_path / "certs", kind="rsa")            # the same two files
    assert new.fingerprint != pair.fingerprint
    sp.signal(signal.SIGHUP)
    sp.log.wait_for(r"INFO TLS reload ok$")
    sp.log.wait_for(rf"TLS certificate {re.escape(str(new.cert))}: .*SHA-256 {new.fingerprint}$")
    assert "TLS reload refused" not in sp.log.text()
