"""The SMTP state machine's STARTTLS (RFC 3207, SPEC §8) and CHUNKING (RFC 3030, SPEC
§10), fed whole and one byte at a time (the `mode` fixture of test_protocol)."""

from __future__ import annotations

import pytest

from prefork_smtp.smtp import protocol as P
from prefork_smtp.smtp import replies as R
from test_protocol import (EHLO, HELO, MAIL, RCPT, S250_QUEUED, S250_RCPT, S250_SENDER, S503,
                           S554_NO_RCPT, S552, S221, bdat, connect, expect, mode, rcpt)  # noqa: F401

TLS = "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
S220_TLS = bytes(R.READY_FOR_TLS)
S502_TLS = bytes(R.TLS_NOT_AVAILABLE)
S554_TLS = bytes(R.TLS_ALREADY_ACTIVE)
S530 = bytes(R.TLS_REQUIRED)
S501_BDAT = b"501 5.5.4 "


def octets(n: int) -> bytes:
    return bytes(R.fill(R.CHUNK_RECEIVED, n))


def extensions(client) -> set[str]:
    [reply] = client.send(EHLO)
    return {line[4:].decode() for line in reply.split(b"\r\n")[1:-1]}


# --- STARTTLS ---------------------------------------------------------------------------

def test_starttls_is_offered_only_with_a_certificate_and_before_tls(mode):
    assert "STARTTLS" not in extensions(connect(mode))
    assert "STARTTLS" in extensions(connect(mode, tls_available=True))
    assert "STARTTLS" not in extensions(connect(mode, tls_available=True, tls=TLS))
    assert {"CHUNKING", "PIPELINING", "8BITMIME", "SMTPUTF8"} <= extensions(connect(mode))


def test_starttls_without_a_certificate_is_502(mode):
    client = connect(mode)
    assert client.send(EHLO + b"STARTTLS\r\n")[1:] == [S502_TLS]
    assert not client.tls_started and client.conn.state is P.State.GREETED


def test_a_second_starttls_is_554(mode):
    client = connect(mode, tls_available=True, tls=TLS)
    assert client.send(EHLO + b"STARTTLS\r\n")[1:] == [S554_TLS]
    assert not client.tls_started


def test_starttls_says_220_then_hands_over(mode):
    client = connect(mode, tls_available=True)
    assert client.send(EHLO + b"STARTTLS\r\n")[1:] == [S220_TLS]
    assert client.tls_started and client.conn.state is P.State.STARTING_TLS
    assert client.conn.unprocessed == b""
    assert client.send(b"NOOP\r\n") == []   # nothing more is read in plain text


@pytest.mark.parametrize("injected", [
    b"MAIL FROM:<mallory@evil.test>\r\n",
    b"RSET\r\nMAIL FROM:<mallory@evil.test>\r\nRCPT TO:<alice@example.org>\r\n",
    b"\x16\x03\x01\x02\x00\x01",      # the start of a ClientHello: still not ours to read
])
def test_commands_pipelined_after_starttls_are_never_executed(mode, injected):
    # CVE-2011-0411: a man in the middle appends commands to the STARTTLS packet.
    client = connect(mode, tls_available=True)
    replies = client.send(EHLO + b"STARTTLS\r\n" + injected)
    assert replies[1:] == [S220_TLS]
    assert client.tls_started
    assert client.conn.unprocessed == injected
    assert client.conn.state is P.State.STARTING_TLS


def test_starttls_before_ehlo_is_allowed(mode):
    client = connect(mode, tls_available=True)
    assert client.send(b"STARTTLS\r\n") == [S220_TLS]


def test_starttls_in_a_transaction_is_503(mode):
    client = connect(mode, tls_available=True)
    replies = client.send(EHLO + MAIL + b"STARTTLS\r\n")
    assert replies[1] == S250_SENDER and replies[2].startswith(S503)
    assert not client.tls_started


def test_starttls_with_an_argument_is_501(mode):
    client = connect(mode, tls_available=True)
    assert client.send(b"STARTTLS now\r\n")[0].startswith(b"501 5.5.4 ")


@pytest.mark.parametrize("hello, params, protocol", [
    (EHLO, b"", "ESMTPS"), (HELO, b"", "SMTPS"), (EHLO, b" SMTPUTF8", "UTF8SMTPS"),
])
def test_received_protocol_names_tls(mode, hello, params, protocol):
    client = connect(mode, tls_available=True, tls=TLS)
    client.send(hello + MAIL.replace(b"\r\n", params + b"\r\n") + RCPT + b"DATA\r\nHi\r\n.\r\n")
    [message] = client.messages
    assert message.envelope.protocol == protocol
    assert message.envelope.tls == TLS


def test_plain_sessions_say_esmtp_without_tls_details(mode):
    client = connect(mode, tls_available=True)
    client.send(EHLO + MAIL + RCPT + b"DATA\r\nHi\r\n.\r\n")
    [message] = client.messages
    assert (message.envelope.protocol, message.envelope.tls) == ("ESMTP", None)


def test_tls_required_refuses_mail_in_plain_text(mode):
    client = connect(mode, tls_available=True, tls_required=True, tls_cert="c", tls_key="k")
    assert client.send(EHLO + MAIL)[1:] == [S530]
    client = connect(mode, tls_available=True, tls=TLS, tls_required=True, tls_cert="c",
                     tls_key="k")
    assert client.send(EHLO + MAIL)[1:] == [S250_SENDER]


def test_without_smtputf8_it_is_neither_offered_nor_taken(mode):
    client = connect(mode, smtputf8=False)
    assert "SMTPUTF8" not in extensions(client)
    assert client.send(b"MAIL FROM:<a@example.net> SMTPUTF8\r\n")[0].startswith(b"555 5.5.4")


# --- DATA without recipients: 503 or 554 (SPEC §5) -----------------------------------

def test_data_without_a_recipient_given_is_503(mode):
    client = connect(mode)
    assert client.send(EHLO + MAIL + b"DATA\r\n")[2].startswith(S503)


def test_data_with_every_recipient_refused_is_554(mode):
    client = connect(mode)
    replies = client.send(EHLO + MAIL + rcpt("bob@elsewhere.test") + b"DATA\r\n")
    assert replies[2].startswith(b"550 5.7.1") and replies[3] == S554_NO_RCPT


# --- BDAT -------------------------------------------------------------------------------

CONTENT = b"Subject: chunks\r\n\r\n.leading dot stays\r\n.\r\nnot an end marker\r\n"


def test_one_chunk_with_last_is_a_message_taken_as_it_is(mode):
    client = connect(mode)
    replies = client.send(EHLO + MAIL + RCPT + bdat(CONTENT))
    assert replies[1:] == [S250_SENDER, S250_RCPT, S250_QUEUED]
    [message] = client.messages
    assert message.content == CONTENT          # never dot-unstuffed


def test_several_chunks_make_one_message(mode):
    client = connect(mode)
    parts = [CONTENT[:10], CONTENT[10:11], b"", CONTENT[11:]]
    script = EHLO + MAIL + RCPT + b"".join(bdat(p, last=False) for p in parts) + b"BDAT 0 LAST\r\n"
    replies = client.send(script)
    assert replies[3:] == [octets(len(p)) for p in parts] + [S250_QUEUED]
    assert [m.content for m in client.messages] == [CONTENT]
    assert client.send(MAIL)[0] == S250_SENDER        # the next transaction can start


@pytest.mark.parametrize("state, script, refusal", [
    ("connected", b"", b"503 5.5.1 Error: send HELO/EHLO first"),
    ("greeted", EHLO, b"503 5.5.1 Error: need MAIL command"),
    ("mail", EHLO + MAIL, b"503 5.5.1 Error: need RCPT command"),
    ("no valid rcpt", EHLO + MAIL + rcpt("bob@elsewhere.test"), S554_NO_RCPT),
])
def test_a_refused_chunk_is_still_read_whole(mode, state, script, refusal):
    client = connect(mode)
    before = len(client.send(script))
    assert client.conn.state.value == state
    # Its octets look like commands: they must be taken as the chunk, not executed.
    replies = client.send(bdat(b"QUIT\r\nRSET\r\n") + b"NOOP\r\n")
    assert replies[0].startswith(refusal) and replies[1].startswith(b"250 2.0.0 Ok")
    assert len(replies) == 2 and not client.closed and not client.messages, (before, replies)


def test_chunks_over_the_size_limit_are_read_and_refused_until_a_new_mail(mode):
    client = connect(mode, max_size=20)
    replies = client.send(EHLO + MAIL + RCPT + bdat(b"x" * 15, last=False) + bdat(b"y" * 10, last=False)
                          + bdat(b"QUIT\r\n" * 2) + MAIL + RCPT + bdat(b"fits"))
    assert replies[3] == octets(15)
    assert replies[4] == S552
    assert replies[5].startswith(b"503 5.5.1 Error: need MAIL command")
    assert replies[6:] == [S250_SENDER, S250_RCPT, S250_QUEUED]
    assert [m.content for m in client.messages] == [b"fits"]


def test_size_over_the_limit_in_one_chunk_is_552(mode):
    client = connect(mode, max_size=10)
    assert client.send(EHLO + MAIL + RCPT + bdat(b"z" * 11))[3:] == [S552]
    assert client.send(b"NOOP\r\n")[0].startswith(b"250")
    assert not client.messages


@pytest.mark.parametrize("size", [b"+5", b"-5", b"1_0", b"0x10", b"", b"5.0", b"\xd9\xa5"])
def test_a_size_that_is_not_digits_is_501_and_closes(mode, size):
    client = connect(mode)
    replies = client.send(EHLO + MAIL + RCPT + b"BDAT " + size + b"\r\nhello" + b"NOOP\r\n")
    assert replies[3].startswith(S501_BDAT) or replies[3].startswith(b"500 5.5.2"), replies
    if replies[3].startswith(S501_BDAT):
        assert client.closed and len(replies) == 4


def test_a_bad_end_marker_reads_the_chunk_then_501(mode):
    client = connect(mode)
    replies = client.send(EHLO + MAIL + RCPT + b"BDAT 6 FIRST\r\nQUIT\r\n" + b"NOOP\r\n")
    assert replies[3].startswith(S501_BDAT) and replies[4].startswith(b"250")
    assert not client.closed and not client.messages


def test_data_after_bdat_is_503(mode):
    client = connect(mode)
    replies = client.send(EHLO + MAIL + RCPT + bdat(b"abc", last=False) + b"DATA\r\n")
    assert replies[3] == octets(3) and replies[4].startswith(S503)
    assert client.send(b"RSET\r\n" + MAIL)[1] == S250_SENDER


def test_mail_or_rcpt_between_chunks_is_503(mode):
    client = connect(mode)
    replies = client.send(EHLO + MAIL + RCPT + bdat(b"abc", last=False) + MAIL + RCPT)
    assert replies[4].startswith(S503) and replies[5].startswith(S503)


def test_a_chunk_is_content_even_when_it_says_starttls(mode):
    # A BDAT that straddles a STARTTLS is a smuggling attempt: its octets are content.
    client = connect(mode, tls_available=True)
    replies = client.send(EHLO + MAIL + RCPT + b"BDAT 10\r\nSTARTTLS\r\n" + b"BDAT 0 LAST\r\n")
    assert replies[3:] == [octets(10), S250_QUEUED]
    assert not client.tls_started
    assert [m.content for m in client.messages] == [b"STARTTLS\r\n"]


def test_hop_limit_applies_to_chunks(mode):
    client = connect(mode)
    headers = b"Received: from x\r\n" * (P.MAX_RECEIVED_HEADERS + 1) + b"\r\nbody\r\n"
    replies = client.send(EHLO + MAIL + RCPT + bdat(headers[:100], last=False) + bdat(headers[100:]))
    assert replies[-1] == bytes(R.LOOP_DETECTED)
    assert not client.messages


def test_reading_a_chunk_counts_as_reading_data(mode):
    client = connect(mode)
    client.send(EHLO + MAIL + RCPT + b"BDAT 100\r\npart")
    assert client.conn.reading_data and client.conn.in_transaction
    client.send(b"x" * 96)
    assert not client.conn.reading_data


def test_quit_after_chunks_discards_the_message(mode):
    client = connect(mode)
    replies = client.send(EHLO + MAIL + RCPT + bdat(b"abc", last=False) + b"QUIT\r\n")
    assert replies[-1] == S221 and client.closed and not client.messages


def test_help_names_every_command():
    assert bytes(P.HELP) == b"214 2.0.0 Commands: " + " ".join(P.COMMANDS).encode() + b"\r\n"
    assert {"BDAT", "STARTTLS"} <= set(P.COMMANDS)


@pytest.mark.parametrize("ending", [b"RSET\r\n", bdat(b"x" * 30)])
def test_a_transaction_ended_during_a_graceful_stop_closes_at_once(mode, ending):
    # The server began stopping mid-transaction; once the session is idle again it
    # gets its 421 4.3.2 at once, not at its next command or the graceful timeout.
    client = connect(mode, max_size=20)
    client.send(EHLO + MAIL + RCPT)
    client.take(client.conn.shutdown())
    assert not client.closed
    replies = client.send(ending)
    assert replies[-1] == bytes(R.SHUTTING_DOWN) and client.closed
    assert replies[0].startswith((b"250", b"552"))
