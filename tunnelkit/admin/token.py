"""``--admin-token``: the bearer token the admin endpoint requires, read from its file."""

from __future__ import annotations


def load_token(path: str) -> bytes:
    """The token in the file at ``path`` (surrounding whitespace dropped); never logged.

    Raises :class:`ValueError` with a message for ``{admin-token}``.
    """
    try:
        with open(path, "rb") as file:
            token = file.read().strip()
    except OSError as e:
        raise ValueError(f"{{admin-token}} {path}: {e.strerror or e}") from None
    if not token:
        raise ValueError(f"{{admin-token}} {path} is empty")
    return token
