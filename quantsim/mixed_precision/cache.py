"""The evaluations of a mixed-precision search, kept in ``results_dir`` so a rerun with
``clean_start=False`` (an interrupted run, a new target) evaluates only what it has not seen.

One JSON file, ``.cache/mixed_precision_evaluations.json``, rewritten atomically after every
evaluation: ``{"format": 1, "fingerprint": ..., "scores": {key: score}}``. A key names what
was evaluated (which callback, which groups on, every group's setting), so a score is reused
exactly where the same sim state would be evaluated again. The fingerprint covers the groups
and candidates; a cache written for other ones is ignored (with a warning) and replaced.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

from quantsim.atomic import atomic_write_text

FORMAT = 1
FILE = Path(".cache") / "mixed_precision_evaluations.json"


def fingerprint(data: Any) -> str:
    """A short hash of JSON-able ``data``."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class EvaluationCache:
    """Scores by key, read from and written to ``results_dir`` (module docstring).

    Args:
        results_dir: the search's results folder (created if missing).
        print_: fingerprint of the groups and candidates.
        clean_start: forget what an earlier run stored.
    """

    def __init__(self, results_dir: Path, print_: str, clean_start: bool) -> None:
        self.path = results_dir / FILE
        self.fingerprint = print_
        self.scores: Dict[str, float] = {}
        self.hits = 0
        if clean_start:
            if self.path.exists():
                os.remove(self.path)
            return
        self.scores = self._read()

    def _read(self) -> Dict[str, float]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            warnings.warn(f"mixed precision: {self.path} cannot be read ({exc}); it is ignored "
                          "and rewritten", stacklevel=4)
            return {}
        if not (isinstance(data, dict) and data.get("format") == FORMAT
                and isinstance(data.get("scores"), dict)):
            warnings.warn(f"mixed precision: {self.path} is not a cache this version wrote; it "
                          "is ignored and rewritten", stacklevel=4)
            return {}
        if data.get("fingerprint") != self.fingerprint:
            warnings.warn(f"mixed precision: {self.path} was written for other quantizer groups "
                          "or candidates; it is ignored and rewritten", stacklevel=4)
            return {}
        return {str(k): float(v) for k, v in data["scores"].items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def get(self, key: str) -> Optional[float]:
        """The stored score of ``key`` (counted as a hit), or None."""
        score = self.scores.get(key)
        if score is not None:
            self.hits += 1
        return score

    def put(self, key: str, score: float) -> None:
        """Store ``score`` and rewrite the file."""
        self.scores[key] = score
        atomic_write_text(self.path, json.dumps(
            {"format": FORMAT, "fingerprint": self.fingerprint, "scores": self.scores},
            indent=0, allow_nan=True))
