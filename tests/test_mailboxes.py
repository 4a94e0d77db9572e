"""Mailbox naming (SPEC §6) and Router.route: local domains, aliases, allow-list,
catch-all, postmaster, +tag."""

from __future__ import annotations

import pytest

from prefork_smtp.layout import is_safe_mailbox
from prefork_smtp.store.mailboxes import Rejection, Router

NOT_LOCAL, UNKNOWN = Rejection.NOT_LOCAL, Rejection.UNKNOWN_USER


@pytest.mark.parametrize("name, safe", [
    ("alice", True), ("a", True), ("a.b-c_d", True), ("0", True), ("a..b", True),
    ("-x", True), ("_x", True), ("x" * 250, True), ("alice.locks", True), ("lock", True),
    ("", False), (".", False), ("..", False), (".hidden", False), ("a/b", False),
    ("../etc", False), ("alice.lock", False), (".lock", False), ("x" * 251, False),
    ("x" * 245 + ".lock", False), ("Alice", False), ("a b", False), ("a+b", False),
    ("jörg", False), ("a\n", False), ("a\x00", False), ("a\\b", False), ("~x", False),
])
def test_is_safe_mailbox(name, safe):
    assert is_safe_mailbox(name) is safe


def router(**kwargs) -> Router:
    return Router(frozenset({"Example.ORG.", "localhost"}), **kwargs)


OPEN = {}
ALLOW = {"recipients": frozenset({"alice", "bob"})}
ALIASES = {"recipients": frozenset({"alice"}),
           "aliases": {"root": "alice", "sales@example.org": "bob", "info+x": "carol",
                       "jörg": "joerg", "postmaster": "admin"}}
CATCH = {"recipients": frozenset({"alice"}), "catchall": "rest"}
CATCH_OPEN = {"catchall": "rest"}

ROUTES = [
    # local domains, case and the root dot; a bare local-part is local
    (OPEN, "alice", "example.org", "alice"),
    (OPEN, "alice", "EXAMPLE.org.", "alice"),
    (OPEN, "alice", "localhost", "alice"),
    (OPEN, "alice", None, "alice"),
    (OPEN, "Alice", "example.org", "alice"),
    # never a relay
    (OPEN, "alice", "elsewhere.test", NOT_LOCAL),
    (OPEN, "alice", "sub.example.org", NOT_LOCAL),
    (OPEN, "alice", "example.org.elsewhere.test", NOT_LOCAL),
    (OPEN, "alice", "[192.0.2.1]", NOT_LOCAL),
    (OPEN, "postmaster", "elsewhere.test", NOT_LOCAL),
    (CATCH, "alice", "elsewhere.test", NOT_LOCAL),
    # +tag
    (OPEN, "alice+lists", "example.org", "alice"),
    (OPEN, "alice+a+b", "example.org", "alice"),
    (OPEN, "+tag", "example.org", UNKNOWN),
    (ALLOW, "bob+x", "example.org", "bob"),
    # unsafe local-parts
    (OPEN, "a/b", "example.org", UNKNOWN),
    (OPEN, "..", "example.org", UNKNOWN),
    (OPEN, "../etc/passwd", "example.org", UNKNOWN),
    (OPEN, ".hidden", "example.org", UNKNOWN),
    (OPEN, "inbox.lock", "example.org", UNKNOWN),
    (OPEN, "x" * 251, "example.org", UNKNOWN),
    (OPEN, "x" * 250, "example.org", "x" * 250),
    (OPEN, "jörg", "example.org", UNKNOWN),
    (OPEN, "a b", "example.org", UNKNOWN),
    (OPEN, "a%b", "example.org", UNKNOWN),
    # allow-list
    (ALLOW, "alice", "example.org", "alice"),
    (ALLOW, "carol", "example.org", UNKNOWN),
    # postmaster, always
    (ALLOW, "postmaster", None, "postmaster"),
    (ALLOW, "PostMaster", "example.org", "postmaster"),
    (ALLOW, "postmaster+x", "localhost", "postmaster"),
    # aliases: by address, by local-part, before the allow-list
    (ALIASES, "root", "example.org", "alice"),
    (ALIASES, "ROOT", "localhost", "alice"),
    (ALIASES, "root+x", "example.org", "alice"),
    (ALIASES, "sales", "example.org", "bob"),
    (ALIASES, "Sales", "EXAMPLE.ORG.", "bob"),
    (ALIASES, "sales", "localhost", UNKNOWN),
    (ALIASES, "info+x", "example.org", "carol"),
    (ALIASES, "info+y", "example.org", UNKNOWN),
    (ALIASES, "Jörg", "example.org", "joerg"),
    (ALIASES, "postmaster", "example.org", "admin"),
    (ALIASES, "root", "elsewhere.test", NOT_LOCAL),
    # catch-all
    (CATCH, "alice", "example.org", "alice"),
    (CATCH, "carol", "example.org", "rest"),
    (CATCH, "a/b", "example.org", "rest"),
    (CATCH, "postmaster", "example.org", "postmaster"),
    (CATCH_OPEN, "carol", "example.org", "rest"),
]


@pytest.mark.parametrize("kwargs, local, domain, expected", ROUTES,
                         ids=[f"{i}-{l[:20]}@{d}" for i, (_, l, d, _) in enumerate(ROUTES)])
def test_route(kwargs, local, domain, expected):
    assert router(**kwargs).route(local, domain) == expected


@pytest.mark.parametrize("kwargs", [OPEN, ALLOW, ALIASES, CATCH, CATCH_OPEN])
@pytest.mark.parametrize("local", ["a/b", "..", ".x", "x.lock", "A", "jörg", "x" * 300,
                                   "alice", "Bob+tag", "../../root"])
def test_every_mailbox_routed_to_is_safe(kwargs, local):
    result = router(**kwargs).route(local, "example.org")
    assert result is UNKNOWN or is_safe_mailbox(result)
