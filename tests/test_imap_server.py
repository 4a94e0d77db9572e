"""IMAP against the real master (conftest.py) with real clients: Python's imaplib (plain
from loopback, STARTTLS, imaps), curl, mbsync (isync), fetchmail and mutt under tmux,
plus POP3 beside it. Each real-client test skips, saying why, when its program is
missing.

The server listens for SMTP (to deliver test mail), imap, imaps and pop3; users alice
and bob have the password PASSWORD (SHA512-CRYPT: quick to check). TLS uses a trustme
CA; clients are told to trust it.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import poplib
import re
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from pathlib import Path

import crypt_r
import pytest

from conftest import DOMAIN, Server, free_port, make_message
from servers import proxy_v1

PASSWORD = "imap-secret"
USERS = ("alice", "bob")


class ImapServer:
    def __init__(self, server: Server, imap: int, imaps: int, pop3: int, ca, ca_path: Path):
        self.server, self.imap, self.imaps, self.pop3 = server, imap, imaps, pop3
        self.ca, self.ca_path = ca, ca_path

    def tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def login(self, user: str = "alice", select: bool = True) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.imap, timeout=10)
        client.login(user, PASSWORD)
        if select:
            client.select("INBOX")
        return client

    def deliver(self, count: int = 1, user: str = "alice", tag: str = "") -> list[str]:
        ids = []
        for _ in range(count):
            mid = f"<{uuid.uuid4().hex}@test>"
            self.server.send([f"{user}@{DOMAIN}"], make_message(mid, f"subject {tag}{mid}"))
            ids.append(mid)
        self.server.wait_for_text(user, ids[-1].encode())
        return ids


def write_users(path: Path) -> None:
    with open(path, "w") as f:
        for user in USERS:
            salt = crypt_r.mksalt(crypt_r.METHOD_SHA512, rounds=1000)
            f.write(f"{user}:{{SHA512-CRYPT}}{crypt_r.crypt(PASSWORD, salt)}\n")
    path.chmod(0o644)


def start_imap(start_server, work_dir: Path, spool: Path | None = None,
               ports: tuple[int, int, int] | None = None, extra_config: str = "") -> ImapServer:
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path, ca_path = work_dir / "cert.pem", work_dir / "key.pem", work_dir / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    for path in (cert_path, key_path, ca_path):
        path.chmod(0o644)
    users = work_dir / "users"
    if not users.exists():
        write_users(users)
    imap, imaps, pop3 = ports or (free_port(), free_port(), free_port())
    config = (f'users_file = "{users}"\ntls_cert = "{cert_path}"\ntls_key = "{key_path}"\n'
              + extra_config)
    server = start_server(config=config, spool=spool, extra_args=[
        "-l", f"imap://127.0.0.1:{imap}", "-l", f"imaps://127.0.0.1:{imaps}",
        "-l", f"pop3://127.0.0.1:{pop3}"])
    return ImapServer(server, imap, imaps, pop3, ca, ca_path)


@pytest.fixture
def imap_server(start_server, work_dir) -> ImapServer:
    return start_imap(start_server, work_dir)


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")


# --- imaplib ---------------------------------------------------------------------------

def test_login_in_plain_text_from_loopback_and_a_session(imap_server):
    uid_ids = imap_server.deliver(2)
    client = imaplib.IMAP4("127.0.0.1", imap_server.imap, timeout=10)
    assert client.welcome.startswith(b"* OK [CAPABILITY IMAP4rev1 ") and b"STARTTLS" in client.welcome
    assert b"AUTH=PLAIN" in client.welcome and client.welcome.endswith(b"ccsmtp IMAP ready")
    assert client.login("alice", PASSWORD)[0] == "OK"
    assert client.select("INBOX") == ("OK", [b"2"])
    typ, data = client.uid("FETCH", "1:*", "(UID ENVELOPE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    assert typ == "OK"
    assert [m in repr(data) for m in uid_ids] == [True, True]
    typ, data = client.fetch("2", "(BODY[])")
    assert data[0][1].endswith(b"Hello.\r\n") and b"Received: from" in data[0][1]
    assert client.fetch("2", "FLAGS")[1] == [b"2 (FLAGS (\\Seen))"]
    assert client.logout()[0] == "BYE"


def test_wrong_password_is_refused_after_a_delay(imap_server):
    client = imaplib.IMAP4("127.0.0.1", imap_server.imap, timeout=20)
    start = time.monotonic()
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.login("alice", "wrong")
    assert time.monotonic() - start >= 1.5     # SPEC §9: 2 s for the first failure
    assert "imap login failed: user=<alice>" in imap_server.server.stderr()
    assert PASSWORD not in imap_server.server.stderr() and "wrong" not in imap_server.server.stderr()


def test_starttls_then_login(imap_server):
    imap_server.deliver(1)
    client = imaplib.IMAP4("127.0.0.1", imap_server.imap, timeout=10)
    client.starttls(imap_server.tls_context())
    assert "STARTTLS" not in client.capabilities
    client.login("alice", PASSWORD)
    assert client.select("INBOX")[0] == "OK"
    client.logout()


def test_imaps_login_and_authenticate_plain(imap_server):
    client = imaplib.IMAP4_SSL("127.0.0.1", imap_server.imaps, ssl_context=imap_server.tls_context(),
                               timeout=10)
    assert "STARTTLS" not in client.capabilities and "AUTH=PLAIN" in client.capabilities
    typ, _ = client.authenticate("PLAIN", lambda _: f"\0bob\0{PASSWORD}".encode())
    assert typ == "OK"
    assert client.select("INBOX") == ("OK", [b"0"])
    client.logout()


def test_input_sent_after_starttls_is_never_executed(imap_server):
    with socket.create_connection(("127.0.0.1", imap_server.imap), timeout=10) as sock:
        sock.recv(4096)
        sock.sendall(f"a STARTTLS\r\nb LOGIN alice {PASSWORD}\r\n".encode())
        assert sock.recv(4096) == b"a OK Begin TLS negotiation now\r\n"
        tls = imap_server.tls_context().wrap_socket(sock, server_hostname="127.0.0.1")
        tls.sendall(b"c NOOP\r\n")
        assert tls.recv(4096) == b"c OK NOOP completed\r\n"
        tls.sendall(b"d SELECT INBOX\r\n")
        assert tls.recv(4096) == b"d BAD Not logged in\r\n"
    assert "discarded" in imap_server.server.stderr()


def test_a_client_off_loopback_behind_proxy_may_not_send_a_password(start_server, work_dir):
    # Only connections from 127.0.0.2 come through the "proxy" (the test's readiness
    # check and deliveries come from 127.0.0.1).
    imap = start_imap(start_server, work_dir, extra_config='proxy_from = ["127.0.0.2/32"]\n')
    with socket.create_connection(("127.0.0.1", imap.imap), timeout=10,
                                  source_address=("127.0.0.2", 0)) as sock:
        sock.sendall(proxy_v1(("192.0.2.7", 40000), ("127.0.0.1", imap.imap)))
        greeting = sock.recv(4096)
        assert b"LOGINDISABLED" in greeting and b"AUTH=PLAIN" not in greeting
        sock.sendall(f"a LOGIN alice {PASSWORD}\r\n".encode())
        assert sock.recv(4096).startswith(b"a NO [PRIVACYREQUIRED]")
    assert "imap login" not in imap.server.stderr()


def test_idle_sees_a_delivery_within_a_second(imap_server):
    imap_server.deliver(1)
    with socket.create_connection(("127.0.0.1", imap_server.imap), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(f"a LOGIN alice {PASSWORD}\r\nb SELECT INBOX\r\nc IDLE\r\n".encode())
        while not reader.readline().startswith(b"+ idling"):
            pass
        mid = f"<{uuid.uuid4().hex}@idle>"
        imap_server.server.send([f"alice@{DOMAIN}"], make_message(mid))
        sent = time.monotonic()
        sock.settimeout(5)
        assert reader.readline() == b"* 2 EXISTS\r\n"
        assert time.monotonic() - sent < 1.0
        sock.sendall(b"DONE\r\nd LOGOUT\r\n")
        assert reader.readline() == b"c OK IDLE terminated\r\n"


def test_two_sessions_see_each_others_flags_and_expunges(imap_server):
    imap_server.deliver(3)
    a, b = imap_server.login(), imap_server.login()
    a.store("2", "+FLAGS", "(\\Flagged)")
    b.noop()
    assert b"2 FETCH (UID 2 FLAGS (\\Flagged))" in b"".join(b.untagged_responses.get("FETCH", []))\
        or any(b"FLAGS (\\Flagged)" in r for r in b.response("FETCH")[1] if r)
    b.store("1", "+FLAGS", "(\\Deleted)")
    b.expunge()
    typ, data = a.noop()
    assert a.response("EXPUNGE")[1] == [b"1"]
    assert a.fetch("1:*", "(UID FLAGS)")[1] == [b"1 (UID 2 FLAGS (\\Flagged))",
                                                  b"2 (UID 3 FLAGS ())"]


def test_an_expunge_by_pop3_is_seen_by_imap(imap_server):
    imap_server.deliver(2)
    client = imap_server.login()
    pop = poplib.POP3("127.0.0.1", imap_server.pop3, timeout=10)
    pop.user("alice")
    pop.pass_(PASSWORD)
    pop.dele(1)
    pop.quit()
    client.noop()
    assert client.response("EXPUNGE")[1] == [b"1"]
    assert client.fetch("1:*", "UID")[1] == [b"1 (UID 2)"]


def test_uids_and_uidvalidity_survive_a_restart_and_expunges(start_server, work_dir):
    imap = start_imap(start_server, work_dir)
    imap.deliver(3)
    client = imap.login()
    uidvalidity = client.response("UIDVALIDITY")[1]
    client.store("2", "+FLAGS", "(\\Deleted \\Answered)")
    client.store("3", "+FLAGS", "(\\Seen)")
    client.expunge()
    client.logout()
    server = imap.server
    assert server.stop() == 0
    again = start_imap(start_server, work_dir, spool=server.spool, ports=(imap.imap, imap.imaps, imap.pop3))
    client = again.login()
    assert client.response("UIDVALIDITY")[1] == uidvalidity
    assert client.fetch("1:*", "(UID FLAGS)")[1] == [b"1 (UID 1 FLAGS ())",
                                                      b"2 (UID 3 FLAGS (\\Seen))"]
    again.deliver(1)
    client.noop()
    assert client.uid("SEARCH", "ALL")[1] == [b"1 3 4"]


def test_a_large_message_is_streamed_whole(imap_server):
    body = "".join(f"line {n:08d} of a large message\r\n" for n in range(120_000))   # ~4 MB
    imap_server.server.send([f"alice@{DOMAIN}"], make_message("<large@test>", "large", body))
    imap_server.server.wait_for_text("alice", b"line 00119999")
    client = imap_server.login()
    size = int(re.search(rb"RFC822.SIZE (\d+)", client.fetch("1", "RFC822.SIZE")[1][0]).group(1))
    typ, data = client.fetch("1", "BODY.PEEK[]")
    assert typ == "OK" and len(data[0][1]) == size and data[0][1].endswith(body.encode())


# --- other clients --------------------------------------------------------------------------

def test_curl_lists_and_fetches_over_imap_and_imaps(imap_server):
    need("curl")
    [mid] = imap_server.deliver(1)
    common = ["curl", "-sS", "--max-time", "20", "-u", f"alice:{PASSWORD}"]
    listing = subprocess.run(common + [f"imap://127.0.0.1:{imap_server.imap}/"],
                             capture_output=True, text=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    assert '* LIST (\\HasNoChildren) "/" INBOX' in listing.stdout
    for url in (f"imap://127.0.0.1:{imap_server.imap}/INBOX;UID=1",
                f"imaps://127.0.0.1:{imap_server.imaps}/INBOX;UID=1"):
        fetched = subprocess.run(common + ["--cacert", str(imap_server.ca_path), url],
                                 capture_output=True, text=True, timeout=30)
        assert fetched.returncode == 0, fetched.stderr
        assert f"Message-ID: {mid}" in fetched.stdout and "Hello." in fetched.stdout


def mbsync_config(imap: ImapServer, maildir: Path, state: Path) -> str:
    return f"""\
IMAPAccount ccsmtp
Host 127.0.0.1
Port {imap.imap}
User alice
Pass {PASSWORD}
SSLType None
AuthMechs LOGIN

IMAPStore remote
Account ccsmtp

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX

Channel inbox
Far :remote:INBOX
Near :local:INBOX
Create Near
Sync All
Expunge None
SyncState {state}/
"""


def maildir_messages(maildir: Path) -> dict[str, str]:
    """Message-ID -> maildir info flags (the letters after ':2,')."""
    out = {}
    for sub in ("new", "cur"):
        for path in (maildir / "INBOX" / sub).iterdir():
            mid = re.search(rb"Message-ID: (<[^>]+>)", path.read_bytes()).group(1).decode()
            out[mid] = path.name.partition(":2,")[2]
    return out


def test_mbsync_syncs_new_mail_and_flags_both_ways(imap_server, work_dir):
    need("mbsync")
    maildir, state = work_dir / "maildir", work_dir / "mbsync-state"
    maildir.mkdir()
    state.mkdir()
    rc = work_dir / "mbsyncrc"
    rc.write_text(mbsync_config(imap_server, maildir, state))
    first = imap_server.deliver(3)

    def sync() -> subprocess.CompletedProcess:
        proc = subprocess.run(["mbsync", "-c", str(rc), "-V", "inbox"], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    sync()
    assert set(maildir_messages(maildir)) == set(first)
    # New mail only, a flag set on the server, and one set locally.
    [later] = imap_server.deliver(1)
    client = imap_server.login()
    client.store("1", "+FLAGS", "(\\Flagged)")
    local = next(p for sub in ("new", "cur") for p in (maildir / "INBOX" / sub).iterdir()
                 if first[1].encode() in p.read_bytes())
    local.rename(maildir / "INBOX" / "cur" / (local.name.partition(":2,")[0] + ":2,S"))
    sync()
    messages = maildir_messages(maildir)
    files = [p for sub in ("new", "cur") for p in (maildir / "INBOX" / sub).iterdir()]
    assert set(messages) == set(first) | {later} and len(files) == 4   # only the new one came
    assert "F" in messages[first[0]]                                   # server -> local
    client.logout()
    check = imap_server.login()
    assert check.fetch("2", "FLAGS")[1] == [b"2 (FLAGS (\\Seen))"]      # local -> server
    check.logout()


def test_fetchmail_fetches_and_deletes(imap_server, work_dir):
    need("fetchmail")
    ids = imap_server.deliver(2)
    out = work_dir / "fetched.mbox"
    rc = work_dir / "fetchmailrc"
    rc.write_text(f'poll 127.0.0.1 service {imap_server.imap} protocol IMAP auth password\n'
                  f'  user "alice" password "{PASSWORD}" is root here\n'
                  f'  sslproto "" mda "cat >> {out}"\n')
    rc.chmod(0o600)
    proc = subprocess.run(["fetchmail", "-f", str(rc), "--nosyslog", "-v"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HOME": str(work_dir), "FETCHMAILHOME": str(work_dir)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fetched = out.read_text()
    assert all(mid in fetched for mid in ids)
    client = imap_server.login()
    assert client.uid("SEARCH", "ALL")[1] == [b""]


def tmux_screen(tmux: list[str], env: dict) -> str:
    return subprocess.run(tmux + ["capture-pane", "-p"], capture_output=True, text=True,
                          env=env, timeout=10).stdout


def wait_screen(tmux: list[str], env: dict, predicate, what: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        screen = tmux_screen(tmux, env)
        if predicate(screen):
            return screen
        assert time.monotonic() < deadline, f"mutt never showed {what}:\n{screen}"
        time.sleep(0.2)


def test_mutt_over_imaps_deletes_one_and_syncs(imap_server, work_dir):
    need("mutt", "tmux")
    ids = imap_server.deliver(3)
    muttrc = work_dir / "muttrc"
    muttrc.write_text(
        f'set folder="imaps://alice@127.0.0.1:{imap_server.imaps}/"\nset spoolfile="+INBOX"\n'
        f'set imap_pass="{PASSWORD}"\nset ssl_ca_certificates_file="{imap_server.ca_path}"\n'
        f'set certificate_file="{work_dir}/mutt-certs"\nset header_cache=""\nset record=""\n'
        'set move=no\nset delete=yes\nset confirmappend=no\nset imap_check_subscribed=no\n'
        'set mail_check=1\nset timeout=1\n')
    socket_name = f"ccsmtp-imap-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmux = ["tmux", "-L", socket_name]
    env = {**os.environ, "TERM": "xterm", "HOME": str(work_dir)}
    subprocess.run(tmux + ["new-session", "-d", "-x", "200", "-y", "50",
                           f"mutt -n -F {muttrc} -f +INBOX"], check=True, env=env, timeout=10)
    try:
        def ready(screen: str) -> bool:
            if "(o)nce" in screen:       # an unknown certificate: accept it for this run
                subprocess.run(tmux + ["send-keys", "o"], env=env, timeout=10)
            return "Msgs:3" in screen
        wait_screen(tmux, env, ready, "three messages")
        subprocess.run(tmux + ["send-keys", "d"], env=env, timeout=10, check=True)
        time.sleep(0.3)
        subprocess.run(tmux + ["send-keys", "$"], env=env, timeout=10, check=True)
        wait_screen(tmux, env, lambda s: "Msgs:2" in s, "two messages after the sync")
        subprocess.run(tmux + ["send-keys", "q"], env=env, timeout=10)
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True, env=env, timeout=10)
    client = imap_server.login()
    remaining = client.fetch("1:*", "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]")[1]
    found = [mid for mid in ids if mid in repr(remaining)]
    assert found == ids[1:]
