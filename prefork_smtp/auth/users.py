"""The users file (SPEC §9): who may read their mail over POP3 and IMAP, and their passwords.

Owns: reading Dovecot's passwd-file format (`name:{SCHEME}hash[:more fields]`, blank
lines and `#` comments), the password schemes we accept (SCHEMES: argon2id/argon2i as
`doveadm pw` writes them, bcrypt, SHA-512/SHA-256 crypt), checking a password, turning a
login into a user name, and making the `{ARGON2ID}` hashes that ccsmtp-passwd writes.
Must not: write files, log, or show a hash or a password anywhere (not in an error, not
in a repr); never write crypto by hand (argon2-cffi, bcrypt and crypt_r do the work).
`Users.verify` blocks for a hash's worth of CPU and memory: call it in a thread, never
on an event loop.
Fails: load_users raises UsersFileError, one line naming the file and, for a bad
line, its number (any unsupported scheme, a line without one, a malformed hash, a
duplicate user, a name that is not a mailbox name of SPEC §6). verify never raises
for a bad password; it returns False.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hmac
import re
import secrets
from typing import Callable, Iterator, Mapping

import argon2
import bcrypt
import crypt_r

from ..layout import is_safe_mailbox

# What ccsmtp-passwd writes. Dovecot 2.3 writes m=65536 (64 MiB), t=3, p=1 (libsodium's
# "interactive" memory, and at least 3 passes because libsodium 1.0.13 refused fewer);
# that is ~145 ms per check on our 2-core test host and 64 MiB per concurrent check in a
# worker. Half the memory with the same passes keeps Dovecot's (and RFC 9106 §4's) shape at
# ~70 ms here, and any Dovecot can verify it. Salt 16 and tag 32 bytes as libsodium.
ARGON2_TIME_COST = 3
ARGON2_MEMORY_KIB = 32768
ARGON2_PARALLELISM = 1
ARGON2_SALT_BYTES = 16
ARGON2_HASH_BYTES = 32

# bcrypt reads at most 72 bytes of a password; Dovecot (crypt_blowfish) silently ignores
# the rest, bcrypt >= 5 raises instead. Cut here so a password Dovecot accepts works here.
BCRYPT_MAX_PASSWORD_BYTES = 72


class UsersFileError(Exception):
    """A users file that cannot be used; str() is one line naming file (and line)."""

    def __init__(self, path: str, reason: str, line: int | None = None):
        self.path, self.reason, self.line = path, reason, line
        where = f"users file {path}" + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: {reason}")


class MalformedHash(ValueError):
    """A hash that does not parse; the text says what is wrong, never the hash."""


# --- the schemes --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Scheme:
    """One password scheme: how to check its hashes, what sets a hash's cost, and how
    to make a hash of the same cost (the stand-in an unknown user is checked against)."""
    name: str
    cost: Callable[[str], tuple]          # raises MalformedHash
    verify: Callable[[str, bytes], bool]  # constant-time; never raises
    make: Callable[[tuple], str]          # a hash of a random password, with that cost


_B64 = "[A-Za-z0-9+/]"   # PHC strings: standard base64 without '=' padding
_ARGON2 = re.compile(rf"\$(argon2id|argon2i)\$v=19\$m=(\d{{1,10}}),t=(\d{{1,10}}),p=(\d{{1,3}})"
                     rf"\$({_B64}+)\$({_B64}+)")
_ARGON2_TYPES = {"argon2id": argon2.Type.ID, "argon2i": argon2.Type.I}


def _b64_len(text: str) -> int:
    """Bytes in unpadded base64, which must be canonical (unused bits zero), as
    libargon2's decoder insists: a cut-off hash fails here, not at every login."""
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except ValueError:
        raw = None
    if raw is None or base64.b64encode(raw).rstrip(b"=") != text.encode():
        raise MalformedHash("bad base64 in the salt or hash")
    return len(raw)


def _argon2_cost(kind: str) -> Callable[[str], tuple]:
    def cost(hashed: str) -> tuple:
        match = _ARGON2.fullmatch(hashed)
        if not match:
            raise MalformedHash(f"not ${kind}$v=19$m=M,t=T,p=P$SALT$HASH")
        if match.group(1) != kind:
            raise MalformedHash(f"a ${match.group(1)}$ hash under the scheme for ${kind}$")
        m, t, p = (int(match.group(i)) for i in (2, 3, 4))
        salt_len, hash_len = _b64_len(match.group(5)), _b64_len(match.group(6))
        # libargon2's lower limits (argon2.h ARGON2_MIN_*): below them no check can succeed.
        if t < 1 or p < 1 or m < 8 * p or salt_len < 8 or hash_len < 4:
            raise MalformedHash("argon2 parameters below the minimum (t>=1, p>=1, m>=8p, "
                                "salt>=8 bytes, hash>=4 bytes)")
        return (kind, m, t, p, salt_len, hash_len)
    return cost


_ARGON2_CHECKER = argon2.PasswordHasher()   # verify() reads every parameter from the hash


def _argon2_verify(hashed: str, password: bytes) -> bool:
    try:
        return _ARGON2_CHECKER.verify(hashed, password)   # libargon2 compares in constant time
    except argon2.exceptions.VerificationError:    # includes VerifyMismatchError
        return False
    except argon2.exceptions.InvalidHashError:
        return False


def _argon2_make(cost: tuple) -> str:
    kind, m, t, p, salt_len, hash_len = cost
    hasher = argon2.PasswordHasher(time_cost=t, memory_cost=m, parallelism=p, hash_len=hash_len,
                                   salt_len=salt_len, type=_ARGON2_TYPES[kind])
    return hasher.hash(secrets.token_bytes(16))


# $2y$ is what Dovecot writes, $2b$ what OpenBSD and pyca/bcrypt write, $2a$ older ones;
# all three mean the same for hashes made by a correct implementation. $2x$ (the buggy
# pre-2011 crypt_blowfish) is refused.
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")


def _bcrypt_cost(hashed: str) -> tuple:
    match = _BCRYPT.fullmatch(hashed)
    if not match:
        raise MalformedHash("not $2y$NN$ and 53 characters of bcrypt base64 (NN from 04 to 31)")
    return (int(match.group(1)),)


def _bcrypt_verify(hashed: str, password: bytes) -> bool:
    try:   # checkpw compares in constant time
        return bcrypt.checkpw(password[:BCRYPT_MAX_PASSWORD_BYTES], hashed.encode())
    except ValueError:
        return False


def _bcrypt_make(cost: tuple) -> str:
    return bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost[0])).decode()


_CRYPT_DEFAULT_ROUNDS = 5000   # crypt(3) SHA-crypt without rounds=N
_CRYPT_ROUNDS = range(1000, 1_000_000_000)   # what libxcrypt accepts (it refuses others)


def _sha_crypt(name: str, prefix: str, hash_chars: int, method: object) -> Scheme:
    pattern = re.compile(rf"\${prefix}\$(?:rounds=([1-9][0-9]{{0,9}})\$)?[./A-Za-z0-9]{{0,16}}"
                         rf"\$[./A-Za-z0-9]{{{hash_chars}}}")

    def cost(hashed: str) -> tuple:
        match = pattern.fullmatch(hashed)
        if not match:
            raise MalformedHash(f"not ${prefix}$[rounds=N$]SALT$ and {hash_chars} characters "
                                "of crypt base64")
        rounds = int(match.group(1)) if match.group(1) else _CRYPT_DEFAULT_ROUNDS
        if rounds not in _CRYPT_ROUNDS:
            raise MalformedHash("rounds must be from 1000 to 999999999")
        return (rounds,)

    def verify(hashed: str, password: bytes) -> bool:
        try:
            word = password.decode("utf-8")   # crypt_r takes str, and so UTF-8 only
            result = crypt_r.crypt(word, hashed)
        except (UnicodeDecodeError, ValueError):
            return False
        return result is not None and hmac.compare_digest(result.encode(), hashed.encode())

    def make(cost: tuple) -> str:
        return crypt_r.crypt(secrets.token_urlsafe(16), crypt_r.mksalt(method, rounds=cost[0]))

    return Scheme(name, cost, verify, make)


SCHEMES: Mapping[str, Scheme] = {s.name: s for s in (
    Scheme("ARGON2ID", _argon2_cost("argon2id"), _argon2_verify, _argon2_make),
    Scheme("ARGON2I", _argon2_cost("argon2i"), _argon2_verify, _argon2_make),
    Scheme("BLF-CRYPT", _bcrypt_cost, _bcrypt_verify, _bcrypt_make),
    _sha_crypt("SHA512-CRYPT", "6", 86, crypt_r.METHOD_SHA512),
    _sha_crypt("SHA256-CRYPT", "5", 43, crypt_r.METHOD_SHA256),
)}

DEFAULT_SCHEME = SCHEMES["ARGON2ID"]
DEFAULT_COST = ("argon2id", ARGON2_MEMORY_KIB, ARGON2_TIME_COST, ARGON2_PARALLELISM,
                ARGON2_SALT_BYTES, ARGON2_HASH_BYTES)


def hash_password(password: str | bytes) -> str:
    """`{ARGON2ID}$argon2id$v=19$m=...`: the password field ccsmtp-passwd writes, in the
    form `doveadm pw -s ARGON2ID` writes (and `doveadm pw -t` checks)."""
    hasher = argon2.PasswordHasher(time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB,
                                   parallelism=ARGON2_PARALLELISM, hash_len=ARGON2_HASH_BYTES,
                                   salt_len=ARGON2_SALT_BYTES, type=argon2.Type.ID)
    return "{ARGON2ID}" + hasher.hash(_as_bytes(password))


# --- the file -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class User:
    name: str
    scheme: Scheme = dataclasses.field(repr=False)
    hashed: str = dataclasses.field(repr=False)   # without the {SCHEME} prefix
    line: int


_SCHEME_NAME = re.compile(r"\{([A-Za-z0-9._-]{1,32})\}")


def split_lines(data: bytes) -> list[bytes]:
    """The file's lines, each with its own b"\\n" (the last may lack one): joined
    again they give the file back byte for byte."""
    return [line for line in re.split(rb"(?<=\n)", data) if line]


def line_name(line: bytes) -> str | None:
    """The user name a line is about (as written, not lower-cased), or None for a
    blank line or a comment. A line without ':' is all name (and an error later)."""
    text = line.rstrip(b"\n").rstrip(b"\r")
    stripped = text.strip()
    if not stripped or stripped.startswith(b"#"):
        return None
    return text.split(b":", 1)[0].decode("ascii", "replace")


def parse_line(line: bytes, path: str, number: int) -> User | None:
    """One line of the file: a User, None for a blank line or comment, or
    UsersFileError. The message never includes anything after the name."""
    def error(reason: str) -> UsersFileError:
        return UsersFileError(path, reason, number)

    if line_name(line) is None:
        return None
    text = line.rstrip(b"\n").rstrip(b"\r")
    try:
        text_str = text.decode("ascii")
    except UnicodeDecodeError:
        raise error("not ASCII (user names and hashes are ASCII)") from None
    name, colon, rest = text_str.partition(":")
    if not colon:
        raise error("no ':' after the user name (the form is name:{SCHEME}hash)")
    # SPEC §6 names only; lower() on ASCII only, so no Unicode case folding sneaks a
    # different name in (the Kelvin sign lower-cases to 'k').
    name = name.lower()
    if not is_safe_mailbox(name):
        raise error("the user name is not a valid mailbox name (letters, digits, '.', '_', "
                    "'-'; not starting with '.', not ending in '.lock', at most 250)")
    password = rest.split(":", 1)[0]
    match = _SCHEME_NAME.match(password)
    if not match:
        raise error(f"user {name}: no {{SCHEME}} before the hash (use one of {_scheme_list()})")
    scheme = SCHEMES.get(match.group(1).upper())
    if scheme is None:
        raise error(f"user {name}: scheme {{{match.group(1)}}} is not supported "
                    f"(use one of {_scheme_list()}; ccsmtp-passwd writes ARGON2ID)")
    hashed = password[match.end():]
    try:
        scheme.cost(hashed)
    except MalformedHash as e:
        raise error(f"user {name}: malformed {scheme.name} hash: {e}") from None
    return User(name, scheme, hashed, number)


def _scheme_list() -> str:
    return ", ".join(SCHEMES)


def parse_users(data: bytes, path: str) -> dict[str, User]:
    """Every user of a file's contents, or UsersFileError for the first bad line."""
    users: dict[str, User] = {}
    for number, line in enumerate(split_lines(data), 1):
        user = parse_line(line, path, number)
        if user is None:
            continue
        if user.name in users:
            raise UsersFileError(path, f"user {user.name} is already on line "
                                       f"{users[user.name].line}", number)
        users[user.name] = user
    return users


def read_users_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise UsersFileError(path, "does not exist (create it with ccsmtp-passwd)") from None
    except PermissionError:
        raise UsersFileError(path, "permission denied (the ccsmtp user must be able to "
                                   "read it, e.g. mode 0640 and group ccsmtp)") from None
    except IsADirectoryError:
        raise UsersFileError(path, "is a directory") from None
    except OSError as e:
        raise UsersFileError(path, f"cannot read: {e.strerror}") from None


def load_users(path: str) -> "Users":
    """Read and check the whole file: all of it or nothing (a HUP keeps the old users
    when this raises)."""
    return Users(parse_users(read_users_file(path), path), path)


# --- checking passwords ---------------------------------------------------------------------

def _as_bytes(password: str | bytes) -> bytes:
    return password.encode("utf-8") if isinstance(password, str) else bytes(password)


class Users:
    """The users of one file. Immutable after construction, so one object can be shared
    by every thread of a worker."""

    def __init__(self, users: Mapping[str, User], path: str = "-"):
        self.path = path
        self._users = dict(users)
        self._dummy = self._make_dummy()

    def __len__(self) -> int:
        return len(self._users)

    def __repr__(self) -> str:
        return f"<Users {self.path}: {len(self._users)} users>"

    def _make_dummy(self) -> tuple[Scheme, str]:
        """What an unknown user's password is checked against: a hash of a random password
        with the scheme and cost most users of this file have, so that "no such user"
        takes as long as "wrong password" for them (SPEC §9). ccsmtp-passwd's parameters
        for an empty file. Costs one hash at load."""
        costs = collections.Counter((u.scheme.name, u.scheme.cost(u.hashed))
                                    for u in self._users.values())
        name, cost = costs.most_common(1)[0][0] if costs else (DEFAULT_SCHEME.name, DEFAULT_COST)
        scheme = SCHEMES[name]
        return scheme, scheme.make(cost)

    @property
    def dummy_cost(self) -> tuple[str, tuple]:
        """(scheme name, cost) of the stand-in for unknown users (for tests and logs)."""
        scheme, hashed = self._dummy
        return scheme.name, scheme.cost(hashed)

    def cost_of(self, name: str) -> tuple[str, tuple] | None:
        user = self._users.get(name)
        return None if user is None else (user.scheme.name, user.scheme.cost(user.hashed))

    def verify(self, name: str, password: str | bytes) -> bool:
        """True if `name` (as normalize_login gives it) is a user and this is the
        password. Blocking (tens of ms): run it in a thread. Unknown users cost one check
        against the stand-in hash, so they take as long as known ones."""
        user = self._users.get(name)
        scheme, hashed = (user.scheme, user.hashed) if user is not None else self._dummy
        secret = _as_bytes(password)
        # No stored password can contain NUL (Dovecot and crypt(3) read C strings, and
        # SASL PLAIN uses NUL as its separator): check something, then refuse.
        usable = b"\0" not in secret
        matched = scheme.verify(hashed, secret if usable else b"")
        return matched and usable and user is not None

    def names(self) -> Iterator[str]:
        return iter(self._users)


def normalize_login(login: str, local_domains: frozenset[str]) -> str | None:
    """The user name a login means (SPEC §9): lower-cased, `name@DOMAIN` for a local
    domain (lower-case, as Config.domains) is `name`. None for a login that cannot be a
    user: not ASCII, another domain, or not a mailbox name of SPEC §6."""
    if not login.isascii():
        return None
    login = login.lower()
    name, at, domain = login.rpartition("@")
    if not at:
        name = login
    elif domain not in local_domains:
        return None
    return name if is_safe_mailbox(name) else None
