"""The RFC 5321 §4.1.2 path grammar: split_path_and_params, parse_path, parse_params."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork_smtp.smtp.addresses import (NULL_PATH, Address, AddressError, NeedsSMTPUTF8,
                                    parse_params, parse_path, split_path_and_params)


@pytest.mark.parametrize("arg, path, params", [
    ("<a@b.example>", "<a@b.example>", ""),
    ("<a@b.example> SIZE=10 BODY=8BITMIME", "<a@b.example>", "SIZE=10 BODY=8BITMIME"),
    ("  <a@b.example>   SIZE=10  ", "<a@b.example>", "SIZE=10"),
    ("<>", "<>", ""),
    ("<> SMTPUTF8", "<>", "SMTPUTF8"),
    ('<"a>b"@c.example> X=1', '<"a>b"@c.example>', "X=1"),
    ('<"a\\"> b"@c.example> X', '<"a\\"> b"@c.example>', "X"),
    ("a@b.example SIZE=1", "a@b.example", "SIZE=1"),
    ("a@b.example", "a@b.example", ""),
    ("<a@b.example>SIZE=1", "<a@b.example>", "SIZE=1"),
])
def test_split_path_and_params(arg, path, params):
    assert split_path_and_params(arg) == (path, params)


@pytest.mark.parametrize("arg", ["<a@b.example", '<"a>b@c.example>', "<", '<"\\">'])
def test_split_unbalanced(arg):
    with pytest.raises(AddressError):
        split_path_and_params(arg)


@pytest.mark.parametrize("path, local, domain, text", [
    ("<alice@example.org>", "alice", "example.org", "alice@example.org"),
    ("alice@example.org", "alice", "example.org", "alice@example.org"),
    ("<Alice.B+tag@Example.ORG>", "Alice.B+tag", "Example.ORG", "Alice.B+tag@Example.ORG"),
    ("<alice@example.org.>", "alice", "example.org", "alice@example.org."),
    ("<postmaster>", "postmaster", None, "postmaster"),
    ('<"a b"@example.org>', "a b", "example.org", '"a b"@example.org'),
    ('<"a\\"b"@example.org>', 'a"b', "example.org", '"a\\"b"@example.org'),
    ('<"../x"@example.org>', "../x", "example.org", '"../x"@example.org'),
    ("<@r1.example,@r2.example:a@example.org>", "a", "example.org", "a@example.org"),
    ("<a@[192.0.2.1]>", "a", "[192.0.2.1]", "a@[192.0.2.1]"),
    ("<!#$%&'*/=?^_`{|}~-@example.org>", "!#$%&'*/=?^_`{|}~-", "example.org",
     "!#$%&'*/=?^_`{|}~-@example.org"),
])
def test_parse_path(path, local, domain, text):
    assert parse_path(path, allow_null=False, smtputf8=False) == Address(local, domain, text)


def test_null_path():
    assert parse_path("<>", allow_null=True, smtputf8=False) is NULL_PATH
    assert NULL_PATH.text == ""
    with pytest.raises(AddressError):
        parse_path("<>", allow_null=False, smtputf8=False)


BAD_PATHS = [
    "<a@b.example", "<a..b@example.org>", "<.a@example.org>", "<a.@example.org>",
    "<a@-b.example>", "<a@b-.example>", "<a@b..example>", "<a b@example.org>",
    "<a@b@example.org>", "<a@>", "<@example.org>", "<a@example.org >", "< a@example.org>",
    "<a\r@example.org>", "<a\n@example.org>", "<a\x00@example.org>", '<"a\rb"@example.org>',
    '<"a\nb"@example.org>', '<"a\x00b"@example.org>', '<"a\\\rb"@example.org>',
    "<a\x7f@example.org>", "<a\t@example.org>", "<a@exa\rmple.org>", "<a@[1.2\r.3.4]>",
    '<"unterminated@example.org>', "<a@example.org>>", "<<a@example.org>",
    "<@r1.example:>",
]


@pytest.mark.parametrize("path", BAD_PATHS)
@pytest.mark.parametrize("smtputf8", [False, True])
def test_bad_paths(path, smtputf8):
    with pytest.raises(AddressError):
        parse_path(path, allow_null=True, smtputf8=smtputf8)


@pytest.mark.parametrize("path", ["<jörg@example.org>", "<a@bücher.example>",
                                  '<"jö rg"@example.org>', "<друг@example.org>"])
def test_non_ascii_needs_smtputf8(path):
    with pytest.raises(NeedsSMTPUTF8):
        parse_path(path, allow_null=False, smtputf8=False)
    address = parse_path(path, allow_null=False, smtputf8=True)
    assert address.text == path[1:-1]


def test_non_ascii_garbage_is_a_syntax_error_not_needs_smtputf8():
    with pytest.raises(AddressError) as info:
        parse_path("<jö@@example.org>", allow_null=False, smtputf8=False)
    assert not isinstance(info.value, NeedsSMTPUTF8)


@pytest.mark.parametrize("path", ["<a\u0085b@example.org>", "<a@exa\u009bmple.org>",
                                  '<"a\u0085b"@example.org>'])
def test_c1_controls_are_refused_with_smtputf8(path):
    with pytest.raises(AddressError):
        parse_path(path, allow_null=False, smtputf8=True)


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x7f), max_size=30))
def test_accepted_ascii_addresses_hold_no_control_characters(inner):
    try:
        address = parse_path(f"<{inner}>", allow_null=True, smtputf8=False)
    except AddressError:
        return
    assert not _has_control(address.text + address.local_part + (address.domain or ""))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_accepted_utf8_addresses_hold_no_cr_lf_nul(inner):
    try:
        address = parse_path(f"<{inner}>", allow_null=True, smtputf8=True)
    except AddressError:
        return
    for part in (address.text, address.local_part, address.domain or ""):
        assert not set(part) & set("\r\n\x00"), address


@pytest.mark.parametrize("text, params", [
    ("", {}),
    ("SIZE=100", {"SIZE": "100"}),
    ("size=100 body=8BITMIME", {"SIZE": "100", "BODY": "8BITMIME"}),
    ("SMTPUTF8", {"SMTPUTF8": None}),
    ("  SIZE=1   SMTPUTF8 ", {"SIZE": "1", "SMTPUTF8": None}),
    ("X-FOO=a+b", {"X-FOO": "a+b"}),
])
def test_parse_params(text, params):
    assert parse_params(text) == params


@pytest.mark.parametrize("text", ["=x", "SIZE=", "A=b=c", "-A=1", "SIZE=é", "A_B=1", "SIZE=\x01"])
def test_bad_params(text):
    with pytest.raises(AddressError):
        parse_params(text)
