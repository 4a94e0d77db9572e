"""Compare ENVELOPE, BODY, BODYSTRUCTURE and BODY[section] with what Dovecot answers.

Dovecot (Debian's dovecot-imapd) is run as a private process: its `imap` binary in
pre-authenticated mode, talking over a pipe, with its own configuration file, base_dir,
state_dir and log in a temporary directory, serving an mbox this test writes. No port,
no daemon, nothing under /etc is read or written. Skipped when the binary is missing or
will not start.

Both sides' answers go through the same small IMAP response reader, so a value sent
quoted by one server and as a literal by the other compares equal. The corpus avoids
what the model documents as deliberately different from Dovecot (folded or padded
envelope strings, invalid Content-Types, empty address-list members) and what mbox
cannot carry exactly (messages not ending in a line end, lines starting "From ").
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile

import pytest

from prefork_smtp.imap import message as M
from prefork_smtp.imap import response as R

from test_imap_message import (BODY_FIELD_CASES, BOUNDARY_CASES, RICH, SIMPLE, all_parts,
                               nested_messages, nested_multipart)

DOVECOT_IMAP = "/usr/lib/dovecot/imap"

CORPUS: dict[str, bytes] = {
    "simple": SIMPLE,
    "rich": RICH,
    "addresses": (b'From: "Quoted \\"Name\\"" <a@b.c>\r\nSender: alice@example.org (Alice Comment)\r\n'
                  b"Reply-To: <@route1,@route2:r@b.c>\r\nTo: undisclosed-recipients:;\r\n"
                  b'Cc: group: d@e.f, "a b"@example.org;, x@[127.0.0.1]\r\nBcc: =?utf-8?b?w6k=?= <a@b.c>, alice\r\n'
                  b"Subject: \"quotes\" and \\backslash\r\nIn-Reply-To: <a@b>\r\n\r\nbody\r\n"),
    "8-bit header": b"Subject: caf\xc3\xa9\r\nFrom: J\xc3\xb6rg <j@x.de>\r\n\r\nbody\r\n",
    "no body": b"Subject: no body\r\n",
    "empty body": b"Subject: empty body\r\n\r\n",
    "header only, no blank line, then text": b"X: y\r\n\r\n\r\n",
    "nested 99 multiparts": nested_multipart(M.MAX_MIME_DEPTH - 1),
    "nested 99 messages": nested_messages(M.MAX_MIME_DEPTH - 1),
    "nested 100 messages": nested_messages(M.MAX_MIME_DEPTH),
    "deep then shallow": (b"Content-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\n"
                          + nested_multipart(5) + b"\r\n--o\r\n\r\nlast\r\n--o--\r\n"),
}
for name, (data, _) in BOUNDARY_CASES.items():
    CORPUS["boundary: " + name] = data if data.endswith(b"\n") else data + b"\r\n"
for name, (data, _) in BODY_FIELD_CASES.items():
    if name not in ("invalid Content-Type is text/plain", "encoding with a comment"):
        CORPUS["fields: " + name] = data
CORPUS["boundary right after a header"] = (
    b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\n--x\r\n"
    b"\r\nb\r\n--x--\r\n")
CORPUS["close delimiter then outer boundary"] = (
    b"Content-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\nContent-Type: message/rfc822\r\n\r\n"
    b"Content-Type: multipart/alternative; boundary=i\r\n\r\n--i\r\n\r\na\r\n--i--\r\n--o--\r\n")
NAMES = list(CORPUS)

# (message, section): why we answer differently from Dovecot 2.3, on purpose.
KNOWN_DIFFERENCES = {
    ("no body", "HEADER.FIELDS (FROM SUBJECT X-NONE)"):
        "RFC 3501 §6.4.5: no blank line for a message without body and blank line",
    ("no body", "HEADER.FIELDS.NOT (FROM SUBJECT)"): "same",
}


# --- a small reader for IMAP responses --------------------------------------------------

class Reader:
    def __init__(self, data: bytes):
        self.data, self.i = data, 0

    def value(self):
        d = self.data
        c = d[self.i:self.i + 1]
        if c == b"(":
            self.i += 1
            items = []
            while d[self.i:self.i + 1] != b")":
                if d[self.i:self.i + 1] == b" ":
                    self.i += 1
                    continue
                items.append(self.value())
            self.i += 1
            return items
        if c == b'"':
            out = bytearray()
            self.i += 1
            while d[self.i:self.i + 1] != b'"':
                if d[self.i:self.i + 1] == b"\\":
                    self.i += 1
                out += d[self.i:self.i + 1]
                self.i += 1
            self.i += 1
            return bytes(out)
        if c == b"{":
            end = d.index(b"}", self.i)
            n = int(d[self.i + 1:end])
            start = end + 3
            self.i = start + n
            return d[start:self.i]
        start = self.i
        while d[self.i:self.i + 1] not in (b" ", b")", b"\r", b""):
            self.i += 1
        atom = d[start:self.i]
        return None if atom == b"NIL" else atom

    def item_name(self) -> bytes:
        start = self.i
        while self.data[self.i:self.i + 1] not in (b" ", b"["):
            self.i += 1
        if self.data[self.i:self.i + 1] == b"[":
            self.i = self.data.index(b"]", self.i) + 1
            if self.data[self.i:self.i + 1] == b"<":
                self.i = self.data.index(b">", self.i) + 1
        return self.data[start:self.i]


def fetch_responses(data: bytes) -> dict[int, dict[bytes, object]]:
    """{sequence number: {item name: value}} from every `* n FETCH (...)` in the stream."""
    out: dict[int, dict[bytes, object]] = {}
    r = Reader(data)
    while r.i < len(data):
        line_end = data.find(b"\r\n", r.i)
        head = data[r.i:line_end]
        parts = head.split(b" ", 3)
        if len(parts) >= 4 and parts[0] == b"*" and parts[2] == b"FETCH":
            seq = int(parts[1])
            r.i += len(b"* %d FETCH (" % seq)
            items = out.setdefault(seq, {})
            while data[r.i:r.i + 1] != b")":
                if data[r.i:r.i + 1] == b" ":
                    r.i += 1
                    continue
                name = r.item_name()
                r.i += 1
                items[name] = r.value()
            r.i = data.index(b"\r\n", r.i) + 2
        else:
            r.i = line_end + 2
    return out


def parsed(encoded: bytes):
    return Reader(encoded).value()


# --- running Dovecot -----------------------------------------------------------------------

CONFIG = """base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/log
mail_location = mbox:{d}/mail:INBOX={d}/inbox
ssl = no
protocols = imap
mail_uid = {uid}
mail_gid = {gid}
default_internal_user = {user}
default_login_user = {user}
mail_privileged_group =
"""


def sections_for(data: bytes) -> list[bytes]:
    m = M.Message(data)
    specs = [b"", b"HEADER", b"TEXT", b"HEADER.FIELDS (FROM SUBJECT X-NONE)",
             b"HEADER.FIELDS.NOT (FROM SUBJECT)", b"1", b"1.MIME", b"1.HEADER", b"2", b"99"]
    for path, part in list(all_parts(m.root))[:60]:
        if path:
            p = ".".join(map(str, path)).encode()
            specs += [p, p + b".MIME", p + b".HEADER", p + b".TEXT", p + b".1"]
    out = []
    for spec in dict.fromkeys(specs):
        out.append(b"BODY.PEEK[" + spec + b"]")
    out.append(b"BODY.PEEK[]<3.10>")
    return out


@pytest.fixture(scope="module")
def dovecot() -> dict[int, dict[bytes, object]]:
    if not os.access(DOVECOT_IMAP, os.X_OK):
        pytest.skip("Dovecot's imap binary is not installed")
    base = tempfile.mkdtemp(prefix="ccsmtp-dovecot-")
    try:
        for sub in ("mail", "run", "state"):
            os.mkdir(os.path.join(base, sub))
        with open(os.path.join(base, "inbox"), "wb") as f:
            for name in NAMES:
                f.write(b"From MAILER-DAEMON Thu Jan  1 00:00:00 2024\n" + CORPUS[name] + b"\n")
        # As root, Dovecot refuses to give mail access to uid 0: serve it as nobody.
        uid, gid = (65534, 65534) if os.getuid() == 0 else (os.getuid(), os.getgid())
        user = pwd.getpwuid(os.getuid()).pw_name
        with open(os.path.join(base, "dovecot.conf"), "w") as f:
            f.write(CONFIG.format(d=base, uid=uid, gid=gid, user=user))
        if os.getuid() == 0:
            os.chmod(base, 0o755)
            for root, dirs, files in os.walk(base):
                for entry in dirs + files:
                    os.chown(os.path.join(root, entry), uid, gid)
            os.chown(base, uid, gid)
        script = [b"x EXAMINE INBOX", b"a FETCH 1:* (RFC822.SIZE ENVELOPE BODY BODYSTRUCTURE)"]
        for seq, name in enumerate(NAMES, 1):
            script.append(b"s%d FETCH %d (%s)" % (seq, seq, b" ".join(sections_for(CORPUS[name]))))
        script.append(b"z LOGOUT")
        try:
            result = subprocess.run(
                [DOVECOT_IMAP, "-c", os.path.join(base, "dovecot.conf")],
                input=b"\r\n".join(script) + b"\r\n", capture_output=True, timeout=60,
                env={"USER": pwd.getpwuid(uid).pw_name if os.getuid() == 0 else user,
                     "HOME": base, "PATH": "/usr/bin:/bin"})
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"Dovecot did not run: {e}")
        if not result.stdout.startswith(b"* PREAUTH") or b"z OK" not in result.stdout:
            pytest.skip("Dovecot did not start: " + (result.stdout + result.stderr)[:300].decode("latin-1"))
        return fetch_responses(result.stdout)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("name", NAMES)
def test_structure_like_dovecot(dovecot, name: str) -> None:
    data = CORPUS[name]
    theirs = dovecot[NAMES.index(name) + 1]
    m = M.Message(data)
    assert int(theirs[b"RFC822.SIZE"]) == len(data), "mbox did not carry the message exactly"
    assert parsed(R.envelope(m.envelope())) == theirs[b"ENVELOPE"]
    assert parsed(R.body(m.body_structure(), False)) == theirs[b"BODY"]
    assert parsed(R.body(m.body_structure(), True)) == theirs[b"BODYSTRUCTURE"]


@pytest.mark.parametrize("name", NAMES)
def test_sections_like_dovecot(dovecot, name: str) -> None:
    data = CORPUS[name]
    theirs = dovecot[NAMES.index(name) + 1]
    m = M.Message(data)
    for att in sections_for(data):
        spec = att[len(b"BODY.PEEK["):att.index(b"]")].decode()
        partial = None
        if att.endswith(b">"):
            start, count = att[att.index(b"<") + 1:-1].split(b".")
            partial = (int(start), int(count))
        words = spec.split(" ", 1)
        dotted = words[0].split(".") if words[0] else []
        part = tuple(int(x) for x in dotted if x.isdigit())
        text = ".".join(x for x in dotted if not x.isdigit()) or None
        fields = tuple(words[1].strip("()").split()) if len(words) > 1 else ()
        name_in_reply = b"BODY[" + spec.encode() + b"]" + (b"<%d>" % partial[0] if partial else b"")
        if (name, spec) in KNOWN_DIFFERENCES:
            continue
        mine = m.section(part, text, fields, partial).replace(b"\0", b"\x80")
        assert mine == theirs[name_in_reply], name_in_reply
