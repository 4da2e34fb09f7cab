"""The plane fixture of tests/planes.py: one suite per plane, and no suite that silently runs on the other.

The relay suites trust it to put each behaviour on the engine and on Twisted,
so it is held to that here: the classes it makes, the ids it gives, and the
checks that fail a suite whose proxy relays on the other plane.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
from loopback import Forwarder, LoopbackTestCase
from planes import (
    ENGINE,
    PLANES,
    TWISTED,
    TWISTED_NO_SPLICE,
    Plane,
    on_each_plane,
    on_planes,
    relays_natively,
)


@pytest.fixture
def module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A throwaway module for the classes the decorator makes."""
    made = types.ModuleType("plane_probe")
    monkeypatch.setitem(sys.modules, made.__name__, made)
    return made


def suite_in(module: types.ModuleType) -> type[LoopbackTestCase]:
    class Suite(LoopbackTestCase):
        """Something relays.

        More about it.
        """

    Suite.__module__ = module.__name__
    return Suite


def test_a_class_becomes_one_collected_subclass_per_plane(module: types.ModuleType) -> None:
    """OnEngine and OnTwisted subclasses beside the suite, each on its plane; the suite itself is not collected."""
    base = on_each_plane(suite_in(module))
    made = {name: cls for name, cls in vars(module).items() if isinstance(cls, type)}
    assert sorted(made) == ["SuiteOnEngine", "SuiteOnTwisted"]
    assert vars(base)["__test__"] is False
    for plane in PLANES:
        cls = made[f"SuiteOn{plane.name}"]
        assert issubclass(cls, base)
        assert (cls.plane, vars(cls)["__test__"]) == (plane, True)
        assert cls.__doc__ == f"Something relays. ({plane.about})"


def test_a_name_taken_is_refused(module: types.ModuleType) -> None:
    """A second suite that would make the same class name is an error, not a silent replacement."""
    on_planes(TWISTED)(suite_in(module))
    with pytest.raises(TypeError, match="SuiteOnTwisted already exists"):
        on_planes(TWISTED)(suite_in(module))


def test_a_function_is_parametrized_by_plane() -> None:
    """A test function gets a ``plane`` argument, one id per plane."""

    def test_it(plane: Plane) -> None:
        """Nothing."""

    [mark] = on_planes(ENGINE, TWISTED_NO_SPLICE)(test_it).pytestmark  # type: ignore[attr-defined]
    assert mark.args == ("plane", (ENGINE, TWISTED_NO_SPLICE))
    assert mark.kwargs["ids"] == ["engine", "twisted-no-splice"]


def test_every_plane_names_its_engine() -> None:
    """Each plane says --engine native or python: none relies on --engine auto choosing."""
    for plane in PLANES:
        assert plane.args[:2] == ("--engine", "native" if plane.native else "python")


@pytest.mark.parametrize(
    ("log", "native"),
    [
        ("2026-12-03T12:00:00+0000 [tunnelkit.service#info] relaying with the native engine", True),
        (
            "... [tunnelkit.service#info] relaying with Twisted, not the native engine: --engine python",
            False,
        ),
        ("\x1e" + json.dumps({"event": "engine", "native": True}) + "\n", True),
        ("\x1e" + json.dumps({"event": "engine", "native": False}) + "\n", False),
        ("[tunnelkit.service#info] listening on 127.0.0.1:1 (tcp)", None),
    ],
)
def test_the_start_up_event_says_who_relays(log: str, native: bool | None) -> None:
    """The ``engine`` event, text or JSON, is read; a log without it says nothing."""
    assert relays_natively(log) is native


def test_a_process_on_the_other_plane_fails_the_check() -> None:
    """A twistd log that says Twisted relays fails the engine plane's check, and one without the event fails both."""
    twisted = "relaying with Twisted, not the native engine: --no-write-through is a diagnostic"
    TWISTED.check_log(twisted)
    with pytest.raises(AssertionError, match="relays on the other plane"):
        ENGINE.check_log(twisted)
    with pytest.raises(AssertionError, match="no 'engine' start-up event"):
        TWISTED.check_log("")


class FallbackTests(LoopbackTestCase):
    """An in-process forwarder that would fall back to Twisted cannot pass as the engine."""

    def test_engine_plane_refuses_what_the_engine_cannot_serve(self) -> None:
        """--no-write-through is Twisted's: on the engine plane that is a usage error, not a fallback."""
        with pytest.raises(SystemExit, match="--engine native: --no-write-through"):
            Forwarder(*ENGINE.args, "--to", "127.0.0.1:9", "--no-write-through")

    def test_a_forwarder_on_twisted_fails_the_engine_check(self) -> None:
        """A forwarder that --engine auto put on Twisted fails ENGINE's check and passes TWISTED's."""
        fwd = self.forward("--to", "127.0.0.1:9", "--no-write-through")
        TWISTED.check_forwarder(fwd)
        with pytest.raises(AssertionError, match="relays with Twisted"):
            ENGINE.check_forwarder(fwd)
