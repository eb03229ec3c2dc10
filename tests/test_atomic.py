"""A set of files is committed as a unit (quantsim.atomic.replace_files, and export on it): a
failure at any step leaves the old set byte-identical, other files untouched and nothing
temporary behind.

Failures are injected by making quantsim.atomic's own rename helper (every commit and undo
rename goes through it) raise at step k.
"""
from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from models import DigitsCNN, digits_data
from quantsim import QuantizationSimModel, atomic
from quantsim.atomic import PartialCommitError, replace_files
from quantsim.errors import ExportError
from quantsim.export import export

pytestmark = pytest.mark.usefixtures("one_thread")


def _fail_at(monkeypatch, *steps: int) -> List[Tuple[str, str]]:
    """Make the renames numbered ``steps`` (0-based) fail with ENOSPC; returns the log of
    every rename attempted."""
    log: List[Tuple[str, str]] = []
    rename = atomic._rename

    def failing(src, dst):
        log.append((os.fspath(src), os.fspath(dst)))
        if len(log) - 1 in steps:
            raise OSError(errno.ENOSPC, "No space left on device (injected)", os.fspath(dst))
        rename(src, dst)

    monkeypatch.setattr(atomic, "_rename", failing)
    return log


def _tree(folder: Path) -> Dict[str, Tuple[bytes, int]]:
    """Every file below ``folder``: relative path -> (bytes, inode)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_ino)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> List[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".quantsim-")]


# ----------------------------------------------------------------------------------------------
# replace_files
# ----------------------------------------------------------------------------------------------
NEW = ["a.onnx", "b.encodings", "c.pth", "d_qdq.onnx"]  # d is new; a..c replace old files
STALE = ["e.torchscript.pth"]


def _old_set(target: Path) -> Path:
    target.mkdir()
    for name in NEW[:3] + STALE:
        (target / name).write_bytes(f"old {name}".encode())
    (target / "notes.txt").write_text("the user's")
    (target / "runs").mkdir()
    (target / "runs" / "log.txt").write_text("the user's too")
    staging = target / ".staging"
    staging.mkdir()
    for name in NEW:
        (staging / name).write_bytes(f"new {name}".encode())
    return staging


@pytest.mark.parametrize("step", range(len(NEW) + len(STALE)))
def test_replace_files_fails_at_any_step_and_keeps_the_old_set(step, tmp_path, monkeypatch):
    """Renames 0..3 move the new files in, rename 4 moves the stale file out: whichever
    fails, every old file is back (same bytes, same inode), no new file stays, nothing of
    the user's moved, and the old versions' hard links are gone."""
    target = tmp_path / "out"
    staging = _old_set(target)
    before = {k: v for k, v in _tree(target).items() if not k.startswith(".staging")}
    log = _fail_at(monkeypatch, step)
    with pytest.raises(OSError, match="injected"):
        replace_files(staging, target, NEW, STALE)
    after = {k: v for k, v in _tree(target).items() if not k.startswith(".staging")}
    assert after == before
    assert _leftovers(target) == []
    assert log[step][1].startswith(str(target if step < len(NEW) else staging))


def test_replace_files_commits_the_set(tmp_path):
    target = tmp_path / "out"
    staging = _old_set(target)
    user = {k: v for k, v in _tree(target).items() if k in ("notes.txt", "runs/log.txt")}
    replace_files(staging, target, NEW, STALE)
    files = _tree(target)
    assert {n: files[n][0] for n in NEW} == {n: f"new {n}".encode() for n in NEW}
    assert not (target / STALE[0]).exists()
    assert {k: files[k] for k in user} == user
    assert _leftovers(target) == []


def test_a_failed_undo_is_reported_and_keeps_the_old_versions(tmp_path, monkeypatch):
    """Rename 2 fails, then undoing rename 1 fails too: the other renames are still undone,
    and the error names the file that may be new and where its old version is kept."""
    target = tmp_path / "out"
    staging = _old_set(target)
    _fail_at(monkeypatch, 2, 3)
    with pytest.raises(PartialCommitError) as info:
        replace_files(staging, target, NEW, STALE)
    kept = info.value.kept
    assert kept.parent == target and kept.name.startswith(".quantsim-old-")
    assert info.value.mixed == [NEW[1]]
    assert (kept / NEW[1]).read_bytes() == f"old {NEW[1]}".encode()
    assert (target / NEW[1]).read_bytes() == f"new {NEW[1]}".encode()
    assert (target / NEW[0]).read_bytes() == f"old {NEW[0]}".encode()  # undone regardless


def test_a_folder_named_like_an_output_is_refused(tmp_path):
    target = tmp_path / "out"
    staging = _old_set(target)
    (target / NEW[3]).mkdir()
    with pytest.raises(IsADirectoryError):
        replace_files(staging, target, NEW, STALE)
    assert _leftovers(target) == []


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    x = digits_data()[0][:32]
    sim = QuantizationSimModel(DigitsCNN(), x[:4], quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(x), None)
    return sim, x[:2]


def _export(sim, path, x, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export(sim, path, "digits", x, **kwargs)


#: an ONNX export over a TorchScript one: six files renamed in, digits.torchscript.pth out
EXPORT_STEPS = 7


@pytest.mark.parametrize("step", range(EXPORT_STEPS))
def test_failed_re_export_leaves_the_old_set_byte_identical(step, calibrated, tmp_path,
                                                            monkeypatch):
    """A re-export (another mode and encodings version, so every file differs) failing at
    commit step k: the earlier export's files are byte-identical, the user's files in the
    folder untouched, no temporary folder left; the error names the folder and chains the
    cause."""
    sim, x = calibrated
    out = tmp_path / "out"
    _export(sim, out, x, export_to_torchscript=True)
    (out / "notes.txt").write_text("the user's")
    (out / "runs").mkdir()
    (out / "runs" / "log.txt").write_text("the user's too")
    before = _tree(out)
    log = _fail_at(monkeypatch, step)
    with pytest.raises(ExportError, match=f"cannot write into {out}.*unchanged") as info:
        _export(sim, out, x, encoding_version="2.0.0")
    assert isinstance(info.value.__cause__, OSError)
    assert _tree(out) == before
    assert _leftovers(out) == []
    assert len(log) > step


def test_re_export_commits_the_new_set_and_removes_the_other_mode(calibrated, tmp_path,
                                                                   monkeypatch):
    sim, x = calibrated
    out = tmp_path / "out"
    _export(sim, out, x, export_to_torchscript=True)
    (out / "notes.txt").write_text("the user's")
    notes = _tree(out)["notes.txt"]
    log = _fail_at(monkeypatch)  # count the steps, fail none
    files = _export(sim, out, x, encoding_version="2.0.0")
    assert len(log) == EXPORT_STEPS
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in files.all()] + ["notes.txt"])
    assert not (out / "digits.torchscript.pth").exists()
    assert _tree(out)["notes.txt"] == notes


def test_failed_first_export_leaves_no_folder(calibrated, tmp_path, monkeypatch):
    """An export into a folder it would create leaves nothing behind when it fails."""
    sim, x = calibrated
    _fail_at(monkeypatch, 3)
    with pytest.raises(ExportError):
        _export(sim, tmp_path / "new" / "out", x)
    assert not (tmp_path / "new" / "out").exists()
