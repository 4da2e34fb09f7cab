"""``tunnelkit passwd USER [FILE]``: make or update a bcrypt htpasswd entry.

Passwords never go on the command line (other users can read it from
``/proc``): they are asked for twice on a terminal, or read as one line from
standard input when it is not one (``printf '%s\\n' "$PW" | tunnelkit passwd
alice users.htpasswd``).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile
from pathlib import Path

from tunnelkit.policy.htpasswd import (
    DEFAULT_ROUNDS,
    MAX_ROUNDS,
    MIN_ROUNDS,
    HtpasswdError,
    make_entry,
)

#: The exit status of a command stopped by Ctrl-C, as shells report SIGINT.
INTERRUPTED = 130


def _read_password() -> str:
    if sys.stdin.isatty():
        try:
            first = getpass.getpass("New password: ")
            again = getpass.getpass("Re-type new password: ")
        except EOFError:
            # Ctrl-D at the prompt; getpass leaves the cursor after it.
            print(file=sys.stderr)
            raise HtpasswdError("no password given (end of input)") from None
        if again != first:
            raise HtpasswdError("passwords do not match")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def _replace_entry(path: Path, user: str, entry: str) -> bool:
    """Write ``path`` with ``user``'s line replaced (or added), atomically, mode 0600 if new.

    Returns whether the user is new to the file.
    """
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    kept = [line for line in lines if line.split(":", 1)[0] != user]
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write("\n".join([*kept, entry]) + "\n")
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return len(kept) == len(lines)


def main(argv: list[str]) -> int:
    """Run the command; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="tunnelkit passwd",
        description="Print a bcrypt htpasswd line for USER, or set it in FILE.",
    )
    parser.add_argument("user", metavar="USER")
    parser.add_argument("file", metavar="FILE", nargs="?", type=Path)
    parser.add_argument(
        "--cost",
        type=int,
        default=DEFAULT_ROUNDS,
        choices=range(MIN_ROUNDS, MAX_ROUNDS + 1),
        metavar=f"{MIN_ROUNDS}-{MAX_ROUNDS}",
        help=f"bcrypt cost (default {DEFAULT_ROUNDS})",
    )
    args = parser.parse_args(argv)
    try:
        entry = make_entry(args.user, _read_password(), rounds=args.cost)
        if args.file is None:
            print(entry)
        else:
            added = _replace_entry(args.file, args.user, entry)
            print(f"tunnelkit passwd: {'added' if added else 'updated'} {args.user} in {args.file}")
    except (HtpasswdError, OSError) as e:
        print(f"tunnelkit passwd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ntunnelkit passwd: interrupted; nothing was changed", file=sys.stderr)
        return INTERRUPTED
    return 0
