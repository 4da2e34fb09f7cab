"""htpasswd auth files: bcrypt only, constant work per check, no secrets shown."""

from __future__ import annotations

from pathlib import Path

import bcrypt
import pytest

from tunnelkit.policy import htpasswd
from tunnelkit.policy.htpasswd import Htpasswd, HtpasswdError, make_entry

FAST = 4  # bcrypt's lowest cost, to keep the tests quick


def entry(user: str, password: str, prefix: str = "2y") -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(FAST)).decode()
    return f"{user}:${prefix}${hashed[4:]}"


def test_make_entry_round_trips() -> None:
    """A line from make_entry loads, accepts its password and refuses others."""
    line = make_entry("alice", "correct horse", rounds=FAST)
    users = Htpasswd.parse(line.encode())
    assert users.check("alice", "correct horse")
    assert not users.check("alice", "correct hors")
    assert not users.check("alice", "")
    assert not users.check("bob", "correct horse")


def test_make_entry_writes_what_htpasswd_b_writes() -> None:
    """Entries use Apache's ``$2y$`` prefix with the requested cost and no newline."""
    line = make_entry("alice", "pw", rounds=5)
    user, hashed = line.split(":", 1)
    assert user == "alice"
    assert hashed.startswith("$2y$05$")
    assert len(hashed) == 60
    assert "\n" not in line


@pytest.mark.parametrize("prefix", ["2y", "2b", "2a"])
def test_all_bcrypt_prefixes_are_accepted(prefix: str) -> None:
    """``$2y$`` (htpasswd -B), ``$2b$`` and ``$2a$`` entries all verify."""
    users = Htpasswd.parse(entry("u", "secret", prefix).encode())
    assert users.check("u", "secret")
    assert not users.check("u", "Secret")


def test_comments_blank_lines_and_crlf_are_skipped() -> None:
    """``#`` comments, blank lines, CRLF endings and a missing final newline are fine."""
    text = f"# proxy users\r\n\r\n{entry('a', 'pa')}\r\n   \n{entry('b', 'pb')}"
    users = Htpasswd.parse(text.encode())
    assert users.users == frozenset({"a", "b"})
    assert users.check("a", "pa")
    assert users.check("b", "pb")
    assert not users.check("a", "pb")


def test_non_ascii_user_and_password() -> None:
    """UTF-8 user names and passwords work (Basic credentials are decoded as UTF-8)."""
    users = Htpasswd.parse(make_entry("jürgen", "pässwörd", rounds=FAST).encode())
    assert users.check("jürgen", "pässwörd")
    assert not users.check("jurgen", "pässwörd")


def test_load_reads_a_file(tmp_path: Path) -> None:
    """load() reads the file at a path."""
    path = tmp_path / "users.htpasswd"
    path.write_text(make_entry("alice", "pw", rounds=FAST) + "\n")
    assert Htpasswd.load(path).check("alice", "pw")


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    """An unreadable file names the path and the reason."""
    with pytest.raises(HtpasswdError, match=r"nope\.htpasswd: cannot read: No such file"):
        Htpasswd.load(tmp_path / "nope.htpasswd")


WEAK = {
    "apr1": "$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/",
    "sha1": "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
    "crypt": "rOGHhxRzy8qe6",
    "md5crypt": "$1$saltsalt$2vnaRpHa6Jxjz5n83ok8Z0",
    "sha512crypt": "$6$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/jctKu9YterLp8wwnSq.qc.eoxqOmSuNp2xS0ktL3nh/",
    "plain": "password1",
    "bcrypt-truncated": "$2y$05$tooShort",
    "bcrypt-cost-3": "$2y$03$" + "a" * 53,
    "empty": "",
}


@pytest.mark.parametrize("kind", sorted(WEAK))
def test_other_formats_refuse_to_load(kind: str) -> None:
    """Non-bcrypt entries stop the load with the line number, never the hash."""
    text = f"# users\n{entry('good', 'pw')}\nweak:{WEAK[kind]}\n"
    with pytest.raises(HtpasswdError) as info:
        Htpasswd.parse(text.encode(), source="users.htpasswd")
    message = str(info.value)
    assert message.startswith("users.htpasswd line 3: user 'weak' has ")
    assert "only bcrypt is accepted" in message
    assert "\n" not in message
    if WEAK[kind]:
        assert WEAK[kind] not in message


def test_weak_format_is_named() -> None:
    """The message says which weak format was found, so the operator knows what to redo."""
    with pytest.raises(HtpasswdError, match=r"Apache MD5 \(\$apr1\$\) hash, which is weak"):
        Htpasswd.parse(b"u:" + WEAK["apr1"].encode())


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (b"no-colon-here", "line 1: expected USER:HASH"),
        (b":$2y$05$" + b"a" * 53, "line 1: empty user name"),
        (b"u\x01:$2y$05$" + b"a" * 53, "line 1: control character in user name"),
        (b"ok:$2y$05$" + b"a" * 53 + b"\n\xff\xfe:x", "line 2: not UTF-8 text"),
        (b"", "no users defined"),
        (b"# only a comment\n\n", "no users defined"),
    ],
)
def test_malformed_files_are_refused(text: bytes, problem: str) -> None:
    """Lines without a colon, bad user names, non-UTF-8 and empty files are refused."""
    with pytest.raises(HtpasswdError, match=problem):
        Htpasswd.parse(text)


def test_duplicate_users_are_refused() -> None:
    """A user defined twice is ambiguous: both line numbers are named."""
    text = f"{entry('a', 'x')}\n{entry('b', 'y')}\n{entry('a', 'z')}\n"
    with pytest.raises(HtpasswdError, match="line 3: user 'a' is already defined on line 1"):
        Htpasswd.parse(text.encode())


def test_repr_shows_no_hashes() -> None:
    """The repr gives the user count only."""
    line = entry("alice", "pw")
    users = Htpasswd.parse(line.encode())
    assert repr(users) == "<Htpasswd with 1 users>"
    assert line.split(":", 1)[1] not in repr(users)


def spy_on_checkpw(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Record the hash each bcrypt check runs against."""
    seen: list[bytes] = []
    real = bcrypt.checkpw

    def spy(password: bytes, hashed: bytes) -> bool:
        seen.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(htpasswd.bcrypt, "checkpw", spy)
    return seen


def test_unknown_users_cost_one_bcrypt_check_like_known_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unknown users are checked against a dummy hash of the same cost: no timing oracle."""
    users = Htpasswd.parse(f"{entry('alice', 'pw')}\n".encode())
    seen = spy_on_checkpw(monkeypatch)
    assert not users.check("mallory", "pw")
    assert not users.check("alice", "wrong")
    assert [hashed[3:7] for hashed in seen] == [b"$04$", b"$04$"]


def test_dummy_cost_matches_the_slowest_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """With mixed costs, an unknown user costs as much as the slowest real entry."""
    slow = make_entry("slow", "pw", rounds=6)
    users = Htpasswd.parse(f"{entry('fast', 'pw')}\n{slow}\n".encode())
    seen = spy_on_checkpw(monkeypatch)
    assert not users.check("nobody", "pw")
    assert [hashed[3:7] for hashed in seen] == [b"$06$"]


def test_dummy_hash_never_matches_for_unknown_users() -> None:
    """Whatever the password, an unknown user is refused."""
    users = Htpasswd.parse(entry("alice", "pw").encode())
    assert not any(users.check("nobody", pw) for pw in ["", "pw", "-", "x" * 100])


def test_passwords_past_72_bytes_check_like_apache() -> None:
    """bcrypt reads 72 bytes: an entry made from the first 72 accepts the long password."""
    long_password = "p" * 80
    hashed = bcrypt.hashpw(b"p" * 72, bcrypt.gensalt(FAST)).decode()
    users = Htpasswd.parse(f"u:{hashed}".encode())
    assert users.check("u", long_password)
    assert users.check("u", "p" * 72)
    assert not users.check("u", "p" * 71)


def test_nul_in_password_never_matches() -> None:
    """A password with NUL (which C bcrypt would cut short) is always refused."""
    users = Htpasswd.parse(entry("u", "ab").encode())
    assert not users.check("u", "ab\x00")
    assert not users.check("u", "ab\x00cd")


def test_unencodable_password_never_matches() -> None:
    """A password with lone surrogates (not UTF-8 encodable) is refused, not an exception."""
    users = Htpasswd.parse(entry("u", "ab").encode())
    assert not users.check("u", "ab\udcff")


@pytest.mark.parametrize(
    ("user", "password", "problem"),
    [
        ("", "pw", "empty user name"),
        ("a:b", "pw", "':' in user name"),
        ("a\nb", "pw", "control character"),
        ("#admin", "pw", "comment"),
        (" alice", "pw", "spaces around"),
        ("alice", "", "empty password"),
        ("alice", "a\x00b", "NUL"),
        ("alice", "é" * 37, "longer than 72 bytes"),
        ("alice", "ok\udcff", "not valid Unicode"),
    ],
)
def test_make_entry_refuses_what_cannot_work(user: str, password: str, problem: str) -> None:
    """Bad user names and unusable passwords are refused, and the message never shows the password."""
    with pytest.raises(HtpasswdError, match=problem) as info:
        make_entry(user, password, rounds=FAST)
    if len(password) > 2:
        assert password not in str(info.value)


@pytest.mark.parametrize("rounds", [3, 32])
def test_make_entry_cost_bounds(rounds: int) -> None:
    """bcrypt costs outside 4-31 are refused."""
    with pytest.raises(HtpasswdError, match="cost must be 4 to 31"):
        make_entry("alice", "pw", rounds=rounds)


def test_make_entry_accepts_exactly_72_bytes() -> None:
    """72 bytes is bcrypt's whole input, so it is allowed and checks."""
    line = make_entry("u", "é" * 36, rounds=FAST)
    assert Htpasswd.parse(line.encode()).check("u", "é" * 36)
