"""The contract between the two relay planes: one set of names, held by a test.

The C engine exports its constants by name (``SIDES``, ``CLOSE_KINDS``,
``RECORD_FIELDS``, ``COUNTERS``) and the driver builds its lookups from
them; these tests hold them against Python's types, so a change on either
side fails here rather than in a record.
"""

from __future__ import annotations

import attrs
import pytest

from tunnelkit.relay.counters import ListenerCounters
from tunnelkit.relay.tunnel import CloseKind, Side, TunnelRecord

_engine = pytest.importorskip("tunnelkit.engine._engine")

#: The fields of a record that only the engine has: its listener index,
#: whether it spliced (a detail), its TLS connection, and its profile.
ENGINE_ONLY = {"listener", "spliced", "tls", "profile"}


def test_sides_and_close_kinds_are_pythons() -> None:
    """The engine's sides and close kinds are Side's and CloseKind's values, in its numbering."""
    assert set(_engine.SIDES) == {side.value for side in Side}
    assert set(_engine.CLOSE_KINDS) == {kind.value for kind in CloseKind}
    assert len(_engine.SIDES) == len(Side) and len(_engine.CLOSE_KINDS) == len(CloseKind)


def test_record_fields_are_tunnel_records() -> None:
    """A record of the engine names TunnelRecord's fields (but details), in order, plus its own."""
    shared = [field.name for field in attrs.fields(TunnelRecord) if field.name != "details"]
    assert [name for name in _engine.RECORD_FIELDS if name not in ENGINE_ONLY] == shared
    assert set(_engine.RECORD_FIELDS) - set(shared) == ENGINE_ONLY
    assert len(set(_engine.RECORD_FIELDS)) == len(_engine.RECORD_FIELDS)


def test_counters_are_listener_counters() -> None:
    """The engine's counters are ListenerCounters' fields, in order."""
    assert tuple(field.name for field in attrs.fields(ListenerCounters)) == _engine.COUNTERS


def test_counters_add_up() -> None:
    """A listener's endpoints add up field by field."""
    one = ListenerCounters(accepted=1, bytes_up=10)
    assert one + ListenerCounters(accepted=2, tls_failures=1) == ListenerCounters(
        accepted=3, bytes_up=10, tls_failures=1
    )
