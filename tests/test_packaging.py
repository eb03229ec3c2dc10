"""What pip installs: every declared entry point resolves and runs, and the installed metadata
declares the same ones as pyproject.toml (a console script naming a missing module fails here,
not in a user's shell)."""
from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
import tomllib
from typing import Dict, Tuple

from conftest import ROOT


def declared_entry_points() -> Dict[Tuple[str, str], str]:
    """``(group, name) -> 'module:attr'`` from pyproject.toml (scripts, gui-scripts, plugins)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = {("console_scripts", n): v for n, v in project.get("scripts", {}).items()}
    found.update({("gui_scripts", n): v for n, v in project.get("gui-scripts", {}).items()})
    for group, entries in project.get("entry-points", {}).items():
        found.update({(group, n): v for n, v in entries.items()})
    return found


def test_installed_metadata_declares_what_pyproject_declares():
    """The installed distribution was built from this pyproject (a stale install would hide a
    removed or renamed entry point)."""
    installed = {(ep.group, ep.name): ep.value
                 for ep in importlib.metadata.distribution("quantsim").entry_points}
    assert installed == declared_entry_points()


def test_every_declared_entry_point_resolves_and_runs():
    """Each ``module:attr`` imports to a callable, and console scripts answer ``--help``."""
    for (group, name), value in declared_entry_points().items():
        module_name, _, attr = value.partition(":")
        target = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
        assert callable(target), f"{group} {name} = {value} is not callable"
        if group == "console_scripts":
            code = f"import sys; from {module_name} import {attr.split('.')[0]} as f; " \
                   f"sys.argv = [{name!r}, '--help']; f()"
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 timeout=120)
            assert run.returncode == 0 and "usage" in run.stdout.lower(), (name, run.stderr)
