"""The relay planes a behaviour suite runs on, and the one decorator that runs it on each.

How tests choose the plane
==========================

tunnelkit relays on two planes: the C engine (``--engine native``) and
Twisted's protocols (``--engine python``); ``--splice on|off|auto`` and
``--no-write-through`` are variants of each. A :class:`Plane` names one of
them: the options that select it and whether the engine must relay there.

* A suite says where it runs with :func:`on_planes` (``@on_each_plane`` for
  the two planes with their default options), on a trial ``TestCase`` or on a
  pytest test function:

  - on a ``loopback.LoopbackTestCase`` subclass, it makes one concrete
    subclass per plane, named ``<Class>On<Plane>`` (``DataTestsOnEngine``,
    ``DataTestsOnTwistedSplice``) and put beside it in its module; the class
    decorated is their base and is not collected itself;
  - on a test function, it parametrizes its ``plane`` argument (ids
    ``engine``, ``twisted-splice``, ...).

* The plane reaches the proxy one way on each kind of test: in-process,
  ``LoopbackTestCase.forward`` gives :attr:`Plane.args` to ``loopback.Forwarder``
  (``tunnelkit.cli.plugin.Options``) and then checks the service
  (:meth:`Plane.check_forwarder`); as a process, ``processes.twistd(...,
  plane=plane)`` (or ``twistd_argv``, ``start``) puts them on ``twistd -n
  tunnelkit``'s command line and ``Process.wait_listening`` checks the
  ``engine`` start-up event (:meth:`Plane.check_log`).

* A suite never falls back silently: every plane names ``--engine``
  explicitly, so options the engine cannot serve are a usage error on an
  engine plane, and the checks above fail a suite whose proxy relays on the
  other plane anyway. Without a built engine the engine planes fail.

* A behaviour that exists on one plane only (TLS to backends, CONNECT,
  ``ssl:`` listeners and Twisted's splicer are Twisted's; the engine's wait
  nested in the reactor is the engine's) runs with ``@on_planes(TWISTED)`` or
  ``@on_planes(ENGINE)``, so its test names say so.

* Tests that do not name a plane (``--engine auto``, the default) test what
  users get; ``EngineChoiceTests`` in test_relay_sockets.py holds that plain
  forwarding picks the engine.

* A plane's options come before a test's own, so a test that passes
  ``--splice on`` itself gets it on either plane. A new variant is one more
  :class:`Plane` constant here.

The reactor is not a plane: conftest.py installs tunnelkit's reactor, and
``TUNNELKIT_TEST_REACTOR=twisted`` reruns a suite on Twisted's own
(tests/app/test_reactor.py does so for test_relay_sockets.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import pytest
from processes import json_events

T = TypeVar("T")


@attrs.frozen
class Plane:
    """Who relays the tunnels (the engine or Twisted), and how (splice, write-through)."""

    #: The class-name suffix of the suites on this plane (``Engine``, ``TwistedSplice``).
    name: str
    #: The command-line options that select it, before a test's own.
    args: tuple[str, ...]
    #: Whether the engine relays (``--engine native``), else Twisted.
    native: bool
    #: How it relays, for the docstrings of the generated classes.
    about: str

    @property
    def id(self) -> str:
        """The pytest id: ``TwistedNoSplice`` is ``twisted-no-splice``."""
        return "".join(f"-{c.lower()}" if c.isupper() else c for c in self.name).lstrip("-")

    def check_forwarder(self, forwarder: Any) -> None:
        """Fail unless an in-process ``loopback.Forwarder`` relays on this plane."""
        assert forwarder.native is self.native, (
            f"{self.id}: the forwarder relays with "
            f"{'the engine' if forwarder.native else 'Twisted'}"
        )

    def check_log(self, text: str) -> None:
        """Fail unless the ``engine`` start-up event in a ``twistd`` log (text or JSON) is this plane's."""
        native = relays_natively(text)
        assert native is not None, f"{self.id}: no 'engine' start-up event in the log\n{text}"
        assert native is self.native, f"{self.id}: the process relays on the other plane\n{text}"


def relays_natively(text: str) -> bool | None:
    """What the ``engine`` start-up event of a text or JSON log says (True: the engine relays); ``None`` before it."""
    for line in text.splitlines():
        if "relaying with the native engine" in line:
            return True
        if "relaying with Twisted" in line:
            return False
    events = [e for e in json_events(text) if e.get("event") == "engine"]
    return bool(events[0].get("native")) if events else None


NATIVE = ("--engine", "native")
PYTHON = ("--engine", "python")

ENGINE = Plane("Engine", NATIVE, True, "on the engine (--splice auto)")
ENGINE_SPLICE = Plane(
    "EngineSplice", (*NATIVE, "--splice", "on"), True, "on the engine, every tunnel spliced"
)
ENGINE_NO_SPLICE = Plane(
    "EngineNoSplice", (*NATIVE, "--splice", "off"), True, "on the engine, without splice(2)"
)
TWISTED = Plane("Twisted", PYTHON, False, "on Twisted's protocols (--splice auto)")
TWISTED_SPLICE = Plane(
    "TwistedSplice", (*PYTHON, "--splice", "on"), False, "on Twisted, every tunnel spliced"
)
TWISTED_NO_SPLICE = Plane(
    "TwistedNoSplice", (*PYTHON, "--splice", "off"), False, "on Twisted, without splice(2)"
)
TWISTED_QUEUED = Plane(
    "TwistedQueued",
    (*PYTHON, "--splice", "off", "--no-write-through"),
    False,
    "on Twisted, every write queued (no splice, no write-through)",
)

#: The two planes with their default options.
PLANES = (ENGINE, TWISTED)

#: Each plane with splice(2) as needed (auto), from the join (on) and never (off).
SPLICE_VARIANTS = (
    ENGINE,
    ENGINE_SPLICE,
    ENGINE_NO_SPLICE,
    TWISTED,
    TWISTED_SPLICE,
    TWISTED_NO_SPLICE,
)


def on_planes(*planes: Plane) -> Callable[[T], T]:
    """Run the decorated suite (a ``LoopbackTestCase`` class) or test function on each of ``planes``."""
    if not planes:
        raise ValueError("on_planes needs at least one plane")

    def decorate(suite: T) -> T:
        if isinstance(suite, type):
            _subclass_per_plane(suite, planes)
            return suite
        mark = pytest.mark.parametrize("plane", planes, ids=[p.id for p in planes])
        decorated: T = mark(suite)
        return decorated

    return decorate


#: Run the suite on the engine and on Twisted, each with its default options.
on_each_plane = on_planes(*PLANES)


def _subclass_per_plane(base: type, planes: tuple[Plane, ...]) -> None:
    """Put ``<base>On<Plane>`` beside ``base`` in its module for each plane; ``base`` is not collected."""
    module = sys.modules[base.__module__]
    summary = (base.__doc__ or base.__name__).strip().splitlines()[0]
    base.__test__ = False  # type: ignore[attr-defined]
    for plane in planes:
        name = f"{base.__name__}On{plane.name}"
        if name in vars(module):
            raise TypeError(f"{base.__module__}.{name} already exists")
        namespace = {
            "__module__": base.__module__,
            "__qualname__": name,
            "__doc__": f"{summary} ({plane.about})",
            "__test__": True,
            "plane": plane,
        }
        setattr(module, name, type(name, (base,), namespace))
