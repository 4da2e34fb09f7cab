"""Compile tunnelkit's native engine (``tunnelkit/engine/_engine.c``) when a wheel is built.

The engine is one C file with no dependency beyond libc and Python's headers,
so it is compiled here with the compiler Python was built with, instead of
switching the project to setuptools. If there is no compiler (or not Linux),
the build goes on without it and ``--engine auto`` relays with Twisted;
``--engine native`` then says why it cannot.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("tunnelkit") / "engine" / "_engine.c"


def compile_engine(root: Path) -> Path | None:
    """Build the extension next to its source; return its path, or ``None`` on failure."""
    if not sys.platform.startswith("linux"):
        return None
    source = root / SOURCE
    target = source.with_name("_engine" + sysconfig.get_config_var("EXT_SUFFIX"))
    # $CC first, as setuptools does; then the compiler Python was built with.
    compiler = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    command = [
        *compiler,
        "-O2",
        "-Wall",
        "-shared",
        "-fPIC",
        f"-I{sysconfig.get_paths()['include']}",
        str(source),
        "-o",
        str(target),
        "-lm",  # log() for source-hash
    ]
    try:
        subprocess.run(command, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"tunnelkit: the native engine was not built ({e}); Twisted relays", file=sys.stderr)
        return None
    return target


class NativeEngineHook(BuildHookInterface):  # type: ignore[type-arg]
    """Adds the compiled engine to the wheel (or, editable, leaves it in the source tree)."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        target = compile_engine(Path(self.root))
        if target is None:
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":
            build_data["force_include"][str(target)] = f"tunnelkit/engine/{target.name}"
