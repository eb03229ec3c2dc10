"""What pip installs: every declared entry point resolves and runs, and the installed metadata
declares the same ones as pyproject.toml (a console script naming a missing module fails here,
not in a user's shell)."""
from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path
from typing import Dict, Tuple

import pytest

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


def _installed_script(name: str) -> str:
    """The console script pip wrote for this interpreter (its scripts folder, then PATH)."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        if (folder / name).is_file():
            return str(folder / name)
    found = shutil.which(name)
    assert found, f"console script {name!r} is declared but not installed (pip install -e .)"
    return found


@pytest.mark.parametrize("name", sorted(n for g, n in declared_entry_points()
                                        if g == "console_scripts"))
def test_every_console_script_runs_as_installed(name):
    """The installed executable itself (not its module) answers --help, and its exit status
    reaches the shell (1 for a failed check; tests/test_cli.py covers the rest in-process)."""
    script = _installed_script(name)
    ok = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith(f"usage: {name}"), ok.stderr
    if name == "quantsim":  # each run costs a fresh interpreter importing torch: one more
        bad = subprocess.run([script, "validate-config",
                              str(ROOT / "tests/data/bad/config_truncated.json")],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1 and "invalid JSON" in bad.stdout, bad.stdout + bad.stderr


def test_python_dash_m_quantsim_is_the_same_command():
    run = subprocess.run([sys.executable, "-m", "quantsim", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "validate-encodings" in run.stdout
