"""The IMAP state machine (protocol.py) with the mailbox commands (mailbox_commands.py)
over a real mail store in a temporary spool: no sockets, no threads.

A Driver plays the session: it writes Send events to a transcript, answers CheckLogin
(the password "secret" is right), runs MailboxWork synchronously and records the other
events. Transcripts are fed whole and one byte at a time; they must agree.
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import pytest

from prefork_smtp.imap import mailbox_commands as M
from prefork_smtp.imap import protocol as IP
from prefork_smtp.imap import response as R
from prefork_smtp.store import mailstore

PASSWORD = "secret"
USER = "alice"


def mbox_message(n: int, subject: str | None = None, body: str = "Hello.\n",
                 extra: str = "") -> bytes:
    subject = subject or f"message {n}"
    return (f"From sender@example.org Mon Jan  1 00:00:{n % 60:02d} 2024\n"
            f"From: Sender <sender@example.org>\nTo: {USER}@example.org\n"
            f"Subject: {subject}\nMessage-ID: <{n}@example.org>\n"
            f"Date: Mon, 1 Jan 2024 00:00:00 +0000\n{extra}\n{body}\n").encode()


def make_spool(path: Path, count: int = 3, name: str = USER) -> str:
    (path / ".ccsmtp").mkdir(parents=True, exist_ok=True)
    with open(path / name, "ab") as f:
        for n in range(1, count + 1):
            f.write(mbox_message(n))
    return str(path)


def append(spool: str, message: bytes, name: str = USER) -> None:
    with open(os.path.join(spool, name), "ab") as f:
        f.write(message)


class Driver:
    def __init__(self, spool: str, *, tls: bool = False, starttls: bool = True,
                 plaintext: bool = True, error_limit: int = 20, max_size: int = 1 << 20):
        self.spool = spool
        self.conn = IP.IMAPConnection(tls=tls, starttls_available=starttls,
                                      plaintext_allowed=plaintext,
                                      max_literal_after_login=max_size,
                                      hard_error_limit=error_limit)
        self.out = bytearray()
        self.events: list = []
        self.closed = False
        self.logins: list[IP.CheckLogin] = []
        self.works: list[IP.MailboxWork] = []
        self.carry(self.conn.greeting())

    def carry(self, events: list) -> None:
        for event in events:
            self.events.append(event)
            if isinstance(event, IP.Send):
                assert not self.closed, "output after Close"
                self.out += event.data
            elif isinstance(event, IP.CheckLogin):
                self.logins.append(event)
                name = event.user.lower()
                self.carry(self.conn.login_ok(name) if event.password == PASSWORD
                           else self.conn.login_failed())
            elif isinstance(event, IP.MailboxWork):
                self.works.append(event)
                output, outcome = M.run(M.job_for(event, self.spool))
                self.out += output
                self.carry(self.conn.work_done(outcome))
            elif isinstance(event, IP.Close):
                self.closed = True

    def feed(self, data: bytes) -> str:
        start = len(self.out)
        self.carry(self.conn.feed(data))
        return self.out[start:].decode("utf-8", "replace")

    def trickle(self, data: bytes) -> str:
        start = len(self.out)
        for i in range(len(data)):
            self.carry(self.conn.feed(data[i:i + 1]))
        return self.out[start:].decode("utf-8", "replace")

    def login(self) -> str:
        return self.feed(b"L1 LOGIN alice secret\r\n")

    def select(self) -> str:
        self.login()
        return self.feed(b"S1 SELECT INBOX\r\n")

    def types(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture
def spool(tmp_path: Path) -> str:
    return make_spool(tmp_path / "spool")


def lines(text: str) -> list[str]:
    return text.split("\r\n")[:-1]


def normalize(text: str) -> str:
    return re.sub(r"UIDVALIDITY \d+", "UIDVALIDITY N", text)


# --- greeting, capabilities, login ----------------------------------------------------------

def test_greeting_offers_capabilities_starttls_and_auth_plain(spool):
    d = Driver(spool)
    assert d.out.decode() == ("* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR IDLE UIDPLUS "
                              "NAMESPACE STARTTLS AUTH=PLAIN] ccsmtp IMAP ready\r\n")


def test_without_a_certificate_starttls_is_not_offered_and_is_bad(spool):
    d = Driver(spool, starttls=False)
    assert "STARTTLS" not in d.out.decode()
    assert d.feed(b"a STARTTLS\r\nb NOOP\r\n") == ("a BAD STARTTLS is not available\r\n"
                                                  "b OK NOOP completed\r\n")
    assert not d.types(IP.StartTLS)


def test_starttls_stops_reading_and_leaves_later_input_unread(spool):
    d = Driver(spool)
    assert d.feed(b"a STARTTLS\r\nb LOGIN alice secret\r\n") == "a OK Begin TLS negotiation now\r\n"
    assert d.types(IP.StartTLS) and not d.logins
    assert d.conn.waiting
    assert d.conn.parser.discard_buffered() == len(b"b LOGIN alice secret\r\n")


def test_after_tls_starttls_is_neither_offered_nor_accepted(spool):
    d = Driver(spool, tls=True)
    assert "STARTTLS" not in d.out.decode()
    assert d.feed(b"a STARTTLS\r\n") == "a BAD TLS is already active\r\n"


def test_plaintext_refused_off_loopback_never_hands_out_the_password(spool):
    d = Driver(spool, plaintext=False)
    assert "LOGINDISABLED" in d.out.decode() and "AUTH=PLAIN" not in d.out.decode()
    plain = base64.b64encode(b"\0alice\0secret")
    out = d.feed(b"a LOGIN alice secret\r\nb AUTHENTICATE PLAIN " + plain + b"\r\n"
                 b"c AUTHENTICATE PLAIN\r\n")
    assert lines(out) == [
        "a NO [PRIVACYREQUIRED] Use STARTTLS first: passwords are not accepted in plain text",
        "b NO [PRIVACYREQUIRED] Use STARTTLS first: passwords are not accepted in plain text",
        "c NO [PRIVACYREQUIRED] Use STARTTLS first: passwords are not accepted in plain text"]
    assert d.logins == [] and d.conn.state is IP.State.NOT_AUTHENTICATED


def test_login_then_capabilities_change(spool):
    d = Driver(spool)
    assert d.login() == ("L1 OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR IDLE UIDPLUS NAMESPACE] "
                         "Logged in\r\n")
    assert d.logins[0].user == "alice" and "secret" not in repr(d.logins[0])
    assert d.feed(b"a CAPABILITY\r\n") == ("* CAPABILITY IMAP4rev1 LITERAL+ SASL-IR IDLE "
                                           "UIDPLUS NAMESPACE\r\na OK Capability completed\r\n")
    assert d.feed(b"b LOGIN alice secret\r\n") == "b BAD Already logged in\r\n"


def test_wrong_password_is_no_authenticationfailed_and_counts(spool):
    d = Driver(spool, error_limit=2)
    out = d.feed(b"a LOGIN alice wrong\r\nb LOGIN alice wrong\r\nc LOGIN alice wrong\r\n"
                 b"d NOOP\r\n")
    assert lines(out) == ["a NO [AUTHENTICATIONFAILED] Authentication failed"] * 1 + [
        "b NO [AUTHENTICATIONFAILED] Authentication failed",
        "c NO [AUTHENTICATIONFAILED] Authentication failed",
        "* BYE Too many errors"]
    assert d.closed and len(d.logins) == 3


@pytest.mark.parametrize("dialogue", [
    [b"a AUTHENTICATE PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n"],
    [b"a AUTHENTICATE PLAIN\r\n", base64.b64encode(b"\0alice\0secret") + b"\r\n"],
    [b"a AUTHENTICATE PLAIN " + base64.b64encode(b"alice\0alice\0secret") + b"\r\n"],
])
def test_authenticate_plain_with_and_without_initial_response(spool, dialogue):
    d = Driver(spool)
    out = "".join(d.feed(part) for part in dialogue)
    assert out.endswith("a OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR IDLE UIDPLUS NAMESPACE] "
                        "Logged in\r\n")
    assert d.conn.state is IP.State.AUTHENTICATED and d.conn.user == "alice"


def test_authenticate_cancel_bad_base64_other_mechanism_and_other_authzid(spool):
    d = Driver(spool)
    assert d.feed(b"a AUTHENTICATE PLAIN\r\n") == "+ \r\n"
    assert d.feed(b"*\r\n") == "a BAD Authentication cancelled\r\n"
    assert d.feed(b"b AUTHENTICATE PLAIN\r\n!!!\r\n") == ("+ \r\nb BAD Invalid base64 in SASL "
                                                         "response\r\n")
    assert d.feed(b"c AUTHENTICATE CRAM-MD5\r\n") == "c NO Unsupported authentication mechanism\r\n"
    bob = base64.b64encode(b"bob\0alice\0secret")
    assert d.feed(b"d AUTHENTICATE PLAIN " + bob + b"\r\n") == (
        "d NO Authorization identity must be the user's own\r\n")
    assert d.feed(b"e NOOP\r\n") == "e OK NOOP completed\r\n"
    assert not d.logins


def test_commands_in_the_wrong_state_are_bad(spool):
    d = Driver(spool)
    assert lines(d.feed(b"a SELECT INBOX\r\nb FETCH 1 FLAGS\r\nc IDLE\r\nd FOO\r\n")) == [
        "a BAD Not logged in", "b BAD Not logged in", "c BAD Not logged in",
        "d BAD Unknown command"]
    d.login()
    assert lines(d.feed(b"e FETCH 1 FLAGS\r\nf UID STORE 1 FLAGS ()\r\ng CLOSE\r\n")) == [
        "e BAD No mailbox selected", "f BAD No mailbox selected", "g BAD No mailbox selected"]
    assert d.feed(b"h ENABLE UTF8=ACCEPT\r\n") == "h BAD Unknown command\r\n"


def test_logout(spool):
    d = Driver(spool)
    assert d.feed(b"a LOGOUT\r\nb NOOP\r\n") == "* BYE Logging out\r\na OK Logout completed\r\n"
    assert d.closed and d.conn.state is IP.State.LOGOUT
    assert d.feed(b"c NOOP\r\n") == ""


# --- mailboxes -------------------------------------------------------------------------------

def test_select_reports_the_mailbox(spool):
    d = Driver(spool)
    out = normalize(d.select())
    assert lines(out) == [
        "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)",
        "* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted.",
        "* 3 EXISTS", "* 0 RECENT", "* OK [UNSEEN 1] First unseen.",
        "* OK [UIDVALIDITY N] UIDs valid", "* OK [UIDNEXT 4] Predicted next UID",
        "S1 OK [READ-WRITE] SELECT completed"]
    assert d.conn.state is IP.State.SELECTED


def test_examine_is_read_only_and_fetching_sets_no_seen(spool):
    d = Driver(spool)
    d.login()
    out = d.feed(b"e EXAMINE inbox\r\n")
    assert "[PERMANENTFLAGS ()]" in out and out.endswith("e OK [READ-ONLY] EXAMINE completed\r\n")
    out = d.feed(b"f FETCH 1 BODY[TEXT]\r\ng STORE 1 +FLAGS (\\Seen)\r\nh EXPUNGE\r\n")
    assert lines(out) == ["* 1 FETCH (BODY[TEXT] {8}", "Hello.", ")", "f OK FETCH completed",
                          "g NO [READ-ONLY] Mailbox is read-only",
                          "h NO [READ-ONLY] Mailbox is read-only"]


def test_a_user_without_mail_yet_selects_an_empty_inbox(tmp_path):
    spool = make_spool(tmp_path / "spool", count=0, name="bob")
    d = Driver(spool)
    d.feed(b"a LOGIN bob secret\r\n")
    out = d.feed(b"b SELECT INBOX\r\nc FETCH 1:* FLAGS\r\nd UID FETCH 1:* FLAGS\r\n")
    assert "* 0 EXISTS" in out
    assert lines(out)[-2:] == ["c BAD Invalid message sequence number", "d OK FETCH completed"]


def test_only_inbox_exists(spool):
    d = Driver(spool)
    d.login()
    out = d.feed(b"a SELECT Trash\r\nb STATUS Sent (MESSAGES)\r\nc CREATE Foo\r\n"
                 b"d DELETE INBOX\r\ne RENAME INBOX Foo\r\nf SUBSCRIBE Foo\r\ng SUBSCRIBE INBOX\r\n")
    assert lines(out) == [
        f"a NO [CANNOT] {IP.ONLY_INBOX}", f"b NO [CANNOT] {IP.ONLY_INBOX}",
        f"c NO [CANNOT] {IP.CANNOT_CREATE}", f"d NO [CANNOT] {IP.CANNOT_DELETE}",
        f"e NO [CANNOT] {IP.CANNOT_DELETE}", f"f NO [CANNOT] {IP.ONLY_INBOX}",
        "g OK Subscribe completed"]


def test_a_failed_select_leaves_the_selected_state(spool):
    d = Driver(spool)
    d.select()
    assert d.feed(b"a SELECT Other\r\nb FETCH 1 FLAGS\r\n") == (
        f"a NO [CANNOT] {IP.ONLY_INBOX}\r\nb BAD No mailbox selected\r\n")


@pytest.mark.parametrize("reference, pattern, listed", [
    ("", "*", True), ("", "%", True), ("", "INBOX", True), ("", "inbox", True),
    ("", "IN*", True), ("", "Trash", False), ("", "INBOX/%", False), ("IN", "BOX", True),
])
def test_list_shows_only_inbox(spool, reference, pattern, listed):
    d = Driver(spool)
    d.login()
    command = f'a LIST "{reference}" "{pattern}"\r\nb LSUB "{reference}" "{pattern}"\r\n'
    out = lines(d.feed(command.encode()))
    expected = (['* LIST (\\HasNoChildren) "/" INBOX'] if listed else []) + ["a OK LIST completed"]
    expected += (['* LSUB () "/" INBOX'] if listed else []) + ["b OK LSUB completed"]
    assert out == expected


def test_list_with_an_empty_pattern_gives_the_delimiter_and_namespace(spool):
    d = Driver(spool)
    d.login()
    assert lines(d.feed(b'a LIST "" ""\r\nb NAMESPACE\r\n')) == [
        '* LIST (\\Noselect) "/" ""', "a OK LIST completed",
        '* NAMESPACE (("" "/")) NIL NIL', "b OK Namespace completed"]


def test_status(spool):
    d = Driver(spool)
    d.login()
    out = normalize(d.feed(b"a STATUS INBOX (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)\r\n"))
    assert lines(out) == ["* STATUS INBOX (MESSAGES 3 RECENT 0 UIDNEXT 4 UIDVALIDITY N UNSEEN 3)",
                          "a OK STATUS completed"]


def test_append_and_copy_are_refused_and_append_literal_never_invited(spool):
    d = Driver(spool)
    d.select()
    assert d.feed(b"a APPEND INBOX {5}\r\n") == f"a NO [CANNOT] {IP.CANNOT_APPEND}\r\n"
    # LITERAL+: the octets come anyway; they are read and the command is refused.
    assert d.feed(b"b APPEND INBOX {5+}\r\nHello\r\n") == f"b NO [CANNOT] {IP.CANNOT_APPEND}\r\n"
    assert d.feed(b"c COPY 1 Trash\r\nd UID COPY 1 INBOX\r\n") == (
        f"c NO [CANNOT] {IP.CANNOT_COPY}\r\nd NO [CANNOT] {IP.CANNOT_COPY}\r\n")
    assert d.feed(b"e NOOP\r\n") == "e OK NOOP completed\r\n"


def test_literals_are_invited_up_to_64k_before_login_and_max_size_after(spool):
    d = Driver(spool, max_size=200_000)
    assert d.feed(b"a LOGIN {70000}\r\n") == "a BAD [TOOBIG] Literal too big\r\n"
    assert d.feed(b"b LOGIN {5}\r\n") == "+ Ready for literal data\r\n"
    assert d.feed(b"alice secret\r\n").startswith("b OK")
    assert d.feed(b"c STATUS {70000}\r\n") == "+ Ready for literal data\r\n"
    assert d.feed(b"x" * 70000 + b" (MESSAGES)\r\n") == f"c NO [CANNOT] {IP.ONLY_INBOX}\r\n"
    assert d.feed(b"d STATUS {300000}\r\n") == "d BAD [TOOBIG] Literal too big\r\n"


def test_a_literal_for_a_command_the_state_does_not_allow_is_not_invited(spool):
    d = Driver(spool)
    assert d.feed(b"a SELECT {5}\r\n") == "a BAD Not logged in\r\n"
    assert d.feed(b"b NOOP\r\n") == "b OK NOOP completed\r\n"


# --- FETCH, STORE, SEARCH, EXPUNGE ---------------------------------------------------------

def test_fetch_items_and_uid_fetch(spool):
    d = Driver(spool)
    d.select()
    out = d.feed(b"a FETCH 1:2 (UID FLAGS RFC822.SIZE INTERNALDATE)\r\n")
    assert lines(out) == [
        '* 1 FETCH (UID 1 FLAGS () RFC822.SIZE 155 INTERNALDATE " 1-Jan-2024 00:00:01 +0000")',
        '* 2 FETCH (UID 2 FLAGS () RFC822.SIZE 155 INTERNALDATE " 1-Jan-2024 00:00:02 +0000")',
        "a OK FETCH completed"]
    out = d.feed(b"b UID FETCH 2:* ENVELOPE\r\n")
    assert lines(out) == [
        '* 2 FETCH (ENVELOPE ("Mon, 1 Jan 2024 00:00:00 +0000" "message 2" (("Sender" NIL '
        '"sender" "example.org")) (("Sender" NIL "sender" "example.org")) (("Sender" NIL '
        '"sender" "example.org")) ((NIL NIL "alice" "example.org")) NIL NIL NIL '
        '"<2@example.org>") UID 2)',
        '* 3 FETCH (ENVELOPE ("Mon, 1 Jan 2024 00:00:00 +0000" "message 3" (("Sender" NIL '
        '"sender" "example.org")) (("Sender" NIL "sender" "example.org")) (("Sender" NIL '
        '"sender" "example.org")) ((NIL NIL "alice" "example.org")) NIL NIL NIL '
        '"<3@example.org>") UID 3)',
        "b OK FETCH completed"]
    assert d.feed(b"c UID FETCH 9:10 FLAGS\r\n") == "c OK FETCH completed\r\n"
    assert d.feed(b"d FETCH 4 FLAGS\r\n") == "d BAD Invalid message sequence number\r\n"


def test_body_fetch_sets_seen_and_peek_does_not(spool):
    d = Driver(spool)
    d.select()
    assert lines(d.feed(b"a FETCH 1 BODY.PEEK[HEADER.FIELDS (SUBJECT)]\r\n")) == [
        "* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT)] {22}", "Subject: message 1", "", ")",
        "a OK FETCH completed"]
    assert lines(d.feed(b"b FETCH 1 BODY[TEXT]<0.3>\r\n")) == [
        "* 1 FETCH (BODY[TEXT]<0> {3}", "Hel FLAGS (\\Seen))", "b OK FETCH completed"]
    assert lines(d.feed(b"c FETCH 1:2 FLAGS\r\n")) == [
        "* 1 FETCH (FLAGS (\\Seen))", "* 2 FETCH (FLAGS ())", "c OK FETCH completed"]
    out = d.feed(b"d UID FETCH 2 RFC822\r\n")
    assert out.startswith("* 2 FETCH (RFC822 {155}\r\nFrom: Sender") and "UID 2 FLAGS (\\Seen))" in out


def test_store_modes_silent_and_uid(spool):
    d = Driver(spool)
    d.select()
    assert lines(d.feed(b"a STORE 1:2 +FLAGS (\\Flagged $Label1)\r\n")) == [
        "* 1 FETCH (FLAGS (\\Flagged $Label1))", "* 2 FETCH (FLAGS (\\Flagged $Label1))",
        "a OK STORE completed"]
    assert lines(d.feed(b"b UID STORE 2 -FLAGS.SILENT (\\Flagged)\r\n")) == ["b OK STORE completed"]
    assert lines(d.feed(b"c UID STORE 1,3 FLAGS (\\Seen)\r\n")) == [
        "* 1 FETCH (UID 1 FLAGS (\\Seen))", "* 3 FETCH (UID 3 FLAGS (\\Seen))", "c OK STORE completed"]
    assert lines(d.feed(b"d FETCH 1:3 FLAGS\r\n")) == [
        "* 1 FETCH (FLAGS (\\Seen))", "* 2 FETCH (FLAGS ($Label1))", "* 3 FETCH (FLAGS (\\Seen))",
        "d OK FETCH completed"]
    assert "$Label1" in d.feed(b"e SELECT INBOX\r\n").splitlines()[0]


def test_search_by_flags_headers_and_body(spool):
    d = Driver(spool)
    d.select()
    d.feed(b"a STORE 2 +FLAGS (\\Deleted)\r\n")
    assert lines(d.feed(b"b SEARCH DELETED\r\nc UID SEARCH NOT DELETED SUBJECT \"message 3\"\r\n"
                        b"d SEARCH BODY hello\r\ne SEARCH CHARSET KOI8-R ALL\r\n")) == [
        "* SEARCH 2", "b OK SEARCH completed", "* SEARCH 3", "c OK SEARCH completed",
        "* SEARCH 1 2 3", "d OK SEARCH completed",
        "e NO [BADCHARSET (US-ASCII UTF-8)] Unsupported charset"]


def test_expunge_uid_expunge_and_close(spool):
    d = Driver(spool)
    d.select()
    d.feed(b"a STORE 1:3 +FLAGS.SILENT (\\Deleted)\r\n")
    assert lines(d.feed(b"b UID EXPUNGE 2\r\n")) == ["* 2 EXPUNGE", "b OK EXPUNGE completed"]
    assert lines(d.feed(b"c EXPUNGE\r\n")) == ["* 2 EXPUNGE", "* 1 EXPUNGE", "c OK EXPUNGE completed"]
    append(d.spool, mbox_message(4) + mbox_message(5))
    assert lines(d.feed(b"d NOOP\r\n")) == ["* 2 EXISTS", "d OK NOOP completed"]
    d.feed(b"e STORE 1 +FLAGS.SILENT (\\Deleted)\r\n")
    assert lines(d.feed(b"f CLOSE\r\ng FETCH 1 FLAGS\r\n")) == [
        "f OK CLOSE completed", "g BAD No mailbox selected"]
    assert "* 1 EXISTS" in d.feed(b"h SELECT INBOX\r\n")


def test_close_removes_what_another_session_flagged_deleted_meanwhile(spool):
    """RFC 3501 §6.4.2: CLOSE removes every message that has \\Deleted set, also one
    another session flagged after this one last looked (as Dovecot does)."""
    a, b = Driver(spool), Driver(spool)
    a.select()
    b.select()
    b.feed(b"x STORE 2 +FLAGS.SILENT (\\Deleted)\r\n")
    assert lines(a.feed(b"c CLOSE\r\n")) == ["c OK CLOSE completed"]
    assert lines(b.feed(b"y NOOP\r\n")) == ["* 2 EXPUNGE", "y OK NOOP completed"]


# --- other sessions' changes ------------------------------------------------------------

def test_other_sessions_flags_and_expunges_are_reported_on_noop_not_during_fetch(spool):
    a, b = Driver(spool), Driver(spool)
    a.select()
    b.select()
    b.feed(b"x STORE 2 +FLAGS (\\Answered)\r\nx2 STORE 3 +FLAGS (\\Deleted)\r\ny EXPUNGE\r\n")
    assert lines(a.feed(b"a FETCH 1 FLAGS\r\n")) == [
        "* 2 FETCH (UID 2 FLAGS (\\Answered))", "* 1 FETCH (FLAGS ())", "a OK FETCH completed"]
    assert lines(a.feed(b"b NOOP\r\n")) == ["* 3 EXPUNGE", "b OK NOOP completed"]


def test_mail_appended_by_delivery_is_reported(spool):
    d = Driver(spool)
    d.select()
    append(spool, mbox_message(4))
    assert lines(d.feed(b"a CHECK\r\n")) == ["* 4 EXISTS", "a OK CHECK completed"]
    assert lines(d.feed(b"b UID FETCH 4 (UID FLAGS)\r\n")) == [
        "* 4 FETCH (UID 4 FLAGS ())", "b OK FETCH completed"]


def test_lost_uidvalidity_says_bye_and_closes(spool):
    d = Driver(spool)
    d.select()
    index = Path(spool) / ".ccsmtp" / "mailstore" / USER / "index"
    index.unlink()
    out = d.feed(b"a NOOP\r\n")
    assert out.startswith("* BYE [UNAVAILABLE]") and "a OK" not in out
    assert d.closed


# --- IDLE ----------------------------------------------------------------------------------

def test_idle_polls_reports_changes_and_ends_with_done(spool):
    d = Driver(spool)
    d.select()
    assert d.feed(b"a IDLE\r\n") == "+ idling\r\n"
    assert d.conn.idling and [type(e) for e in d.events[-2:]] == [IP.IdleStarted, IP.MailboxWork]
    append(spool, mbox_message(4))
    start = len(d.out)
    d.carry(d.conn.mailbox_changed())
    assert d.out[start:] == b"* 4 EXISTS\r\n"
    assert d.feed(b"DONE\r\nb NOOP\r\n") == "a OK IDLE terminated\r\nb OK NOOP completed\r\n"
    assert isinstance(d.types(IP.IdleEnded)[0], IP.IdleEnded)
    assert d.conn.mailbox_changed() == []


def test_idle_change_during_a_poll_polls_again(spool):
    d = Driver(spool)
    d.select()
    d.conn.feed(b"a IDLE\r\n")       # events not carried: the first poll is "running"
    assert d.conn.mailbox_changed() == []
    append(spool, mbox_message(4))
    events = d.conn.work_done(M.Outcome(R.OK, ""))
    assert [type(e) for e in events] == [IP.MailboxWork]


def test_idle_anything_but_done_is_bad(spool):
    d = Driver(spool)
    d.login()
    assert d.feed(b"a IDLE\r\nNOPE\r\n") == "+ idling\r\na BAD Expected DONE\r\n"
    assert d.feed(b"b NOOP\r\n") == "b OK NOOP completed\r\n"


def test_timeout_and_shutdown_say_bye(spool):
    d = Driver(spool)
    d.carry(d.conn.timed_out())
    assert d.out.decode().endswith("* BYE Autologout; idle for too long\r\n") and d.closed
    d = Driver(spool)
    d.select()
    d.feed(b"a IDLE\r\n")
    d.carry(d.conn.shutdown())
    assert d.out.decode().endswith("* BYE Server shutting down\r\n") and d.closed


def test_late_answers_after_close_are_dropped(spool):
    d = Driver(spool)
    d.conn.feed(b"a LOGIN alice secret\r\n")     # CheckLogin pending
    d.carry(d.conn.timed_out())
    assert d.conn.login_ok("alice") == []
    with pytest.raises(RuntimeError):
        Driver(spool).conn.work_done(M.Outcome(R.OK, ""))


# --- errors and chunking -------------------------------------------------------------------

def test_more_than_hard_error_limit_bad_commands_close(spool):
    d = Driver(spool, error_limit=3)
    out = d.feed(b"a FOO\r\nb FOO\r\nc FOO\r\nd FOO\r\ne NOOP\r\n")
    assert lines(out)[-2:] == ["d BAD Unknown command", "* BYE Too many errors"]
    assert d.closed


TRANSCRIPT = (b"a CAPABILITY\r\nb LOGIN {5}\r\nalice {6}\r\nsecret\r\nc SELECT INBOX\r\n"
              b"d FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (Subject)])\r\n"
              b"e UID STORE 1 +FLAGS (\\Seen)\r\nf SEARCH UNSEEN\r\ng IDLE\r\ndone\r\n"
              b"h STATUS INBOX (MESSAGES)\r\ni x\r\nj LOGOUT\r\n")


def test_byte_at_a_time_gives_the_same_transcript(tmp_path):
    whole = Driver(make_spool(tmp_path / "a"))
    trickled = Driver(make_spool(tmp_path / "b"))
    out_whole = whole.feed(TRANSCRIPT)
    out_trickled = trickled.trickle(TRANSCRIPT)
    assert normalize(out_whole) == normalize(out_trickled)
    assert "j OK Logout completed" in out_whole and whole.closed and trickled.closed
