"""Proxy users from an htpasswd file, bcrypt entries only.

``htpasswd -B`` (Apache) writes ``user:$2y$05$...`` lines, and operators
already know the tool, so ``--auth-file`` reads that format. Only bcrypt
(``$2y$``, ``$2b$``, ``$2a$``) is accepted: the other formats htpasswd can
write are fast hashes (Apache MD5 ``$apr1$``, ``{SHA}``, DES ``crypt``) or plain
text, cheap to brute-force once the file leaks, and the file refuses to load
with a message naming the line, never the hash.

What :meth:`Htpasswd.check` promises:

* **No user enumeration by timing.** An unknown user is checked against a
  dummy hash of the same cost as the slowest real entry, so answering takes as
  long as for a known user with a wrong password.
* **Apache's answers.** bcrypt reads at most 72 bytes of password; longer
  passwords are cut there before checking, exactly as Apache and htpasswd do,
  so entries they made keep working. :func:`make_entry` refuses passwords over
  72 bytes instead of silently ignoring their tail.
* **No secrets in reprs or errors.** Neither passwords nor hashes appear in an
  exception message or a repr.

Each check costs one bcrypt computation (about 0.2 s of CPU at the default cost
of 12): callers on a reactor should run it in a thread.
"""

from __future__ import annotations

import os
import re
import secrets

import attrs
import bcrypt

#: bcrypt ignores password bytes past this many.
MAX_PASSWORD_BYTES = 72
#: Cost of new entries: bcrypt's own default. ``htpasswd -B`` uses 5 unless given ``-C``.
DEFAULT_ROUNDS = 12
MIN_ROUNDS = 4
MAX_ROUNDS = 31

_BCRYPT = re.compile(r"\$2[aby]\$(?P<cost>[0-9]{2})\$[./A-Za-z0-9]{53}")
_OTHER_FORMATS = (
    ("$apr1$", "an Apache MD5 ($apr1$) hash, which is weak"),
    ("{SHA}", "a SHA-1 ({SHA}) hash, which is weak"),
    ("{SSHA}", "a salted SHA-1 ({SSHA}) hash, which is weak"),
    ("$1$", "an MD5-crypt ($1$) hash, which is weak"),
    ("$5$", "a SHA-256-crypt ($5$) hash, which is not supported"),
    ("$6$", "a SHA-512-crypt ($6$) hash, which is not supported"),
    ("$argon2", "an argon2 hash, which is not supported"),
    ("$2", "a malformed bcrypt hash"),
)
_ADVICE = "only bcrypt is accepted: recreate it with `htpasswd -B` or `tunnelkit passwd`"


class HtpasswdError(ValueError):
    """An unusable auth file or entry; the message never contains a password or hash."""


def _describe_hash(hashed: str) -> str:
    for prefix, description in _OTHER_FORMATS:
        if hashed.startswith(prefix):
            return description
    return "a hash that is not bcrypt (DES crypt or plain text?)"


def _bad_user(user: str) -> str | None:
    if not user:
        return "empty user name"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in user):
        return "control character in user name"
    if ":" in user:
        return "':' in user name"
    return None


def _secret(password: str) -> bytes | None:
    """The bytes bcrypt checks for ``password``; ``None`` if it can never match."""
    try:
        data = password.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return None if b"\x00" in data else data[:MAX_PASSWORD_BYTES]


@attrs.frozen(repr=False, eq=False)
class Htpasswd:
    """The users of an auth file and their bcrypt hashes; build with :meth:`load` or :meth:`parse`."""

    _hashes: dict[str, bytes]
    _dummy: bytes

    def __repr__(self) -> str:
        return f"<Htpasswd with {len(self._hashes)} users>"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Htpasswd:
        """Read an htpasswd file; :class:`HtpasswdError` names the file and line of any problem."""
        name = os.fspath(path)
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as e:
            raise HtpasswdError(f"{name}: cannot read: {e.strerror}") from None
        return cls.parse(data, source=name)

    @classmethod
    def parse(cls, data: bytes, source: str = "htpasswd") -> Htpasswd:
        """Parse htpasswd content: ``USER:HASH`` lines; blank lines and ``#`` comments are skipped.

        The whole file is refused if any line is not a bcrypt entry, a user
        appears twice, or no user is defined: starting with a partial user list
        would only defer the surprise to a login.
        """
        hashes: dict[str, bytes] = {}
        first_line: dict[str, int] = {}
        for number, raw in enumerate(data.split(b"\n"), start=1):
            where = f"{source} line {number}"
            try:
                line = raw.removesuffix(b"\r").decode("utf-8")
            except UnicodeDecodeError:
                raise HtpasswdError(f"{where}: not UTF-8 text") from None
            if not line.strip() or line.startswith("#"):
                continue
            user, colon, hashed = line.partition(":")
            problem = _bad_user(user) if colon else "expected USER:HASH"
            if problem is not None:
                raise HtpasswdError(f"{where}: {problem}")
            hashed = hashed.strip()
            m = _BCRYPT.fullmatch(hashed)
            if m is None or not MIN_ROUNDS <= int(m["cost"]) <= MAX_ROUNDS:
                raise HtpasswdError(
                    f"{where}: user {user!r} has {_describe_hash(hashed)}; {_ADVICE}"
                )
            if user in hashes:
                raise HtpasswdError(
                    f"{where}: user {user!r} is already defined on line {first_line[user]}"
                )
            hashes[user] = hashed.encode("ascii")
            first_line[user] = number
        if not hashes:
            raise HtpasswdError(f"{source}: no users defined")
        slowest = max(int(h[4:6]) for h in hashes.values())
        dummy = bcrypt.hashpw(secrets.token_hex(16).encode("ascii"), bcrypt.gensalt(slowest))
        return cls(hashes, dummy)

    @property
    def users(self) -> frozenset[str]:
        """The user names defined in the file."""
        return frozenset(self._hashes)

    def check(self, user: str, password: str) -> bool:
        """Whether ``password`` is ``user``'s; takes one bcrypt check whether or not the user exists."""
        hashed = self._hashes.get(user)
        secret = _secret(password)
        candidate = self._dummy if hashed is None else hashed
        matched = bcrypt.checkpw(b"-" if secret is None else secret, candidate)
        return matched and hashed is not None and secret is not None


def make_entry(user: str, password: str, *, rounds: int = DEFAULT_ROUNDS) -> str:
    """An htpasswd line ``user:$2y$...`` (no newline), as ``htpasswd -B -C rounds`` would write.

    The ``$2y$`` prefix is what Apache writes and reads; bcrypt computes the
    same hash for ``$2b$``. Refuses (:class:`HtpasswdError`) user names that
    the file format cannot hold, empty passwords, passwords with NUL, and
    passwords longer than 72 bytes in UTF-8 (bcrypt would ignore the rest).
    """
    problem = _bad_user(user)
    if problem is None and user.startswith("#"):
        problem = "user name starting with '#' (it would read as a comment)"
    if problem is None and user != user.strip():
        problem = "spaces around the user name"
    if problem is not None:
        raise HtpasswdError(problem)
    try:
        data = password.encode("utf-8")
    except UnicodeEncodeError:
        raise HtpasswdError("password is not valid Unicode text") from None
    if not data:
        raise HtpasswdError("empty password")
    if b"\x00" in data:
        raise HtpasswdError("NUL character in password")
    if len(data) > MAX_PASSWORD_BYTES:
        raise HtpasswdError(f"password longer than {MAX_PASSWORD_BYTES} bytes (bcrypt's limit)")
    if not MIN_ROUNDS <= rounds <= MAX_ROUNDS:
        raise HtpasswdError(f"bcrypt cost must be {MIN_ROUNDS} to {MAX_ROUNDS}, not {rounds}")
    hashed = bcrypt.hashpw(data, bcrypt.gensalt(rounds)).decode("ascii")
    return f"{user}:$2y${hashed[4:]}"
