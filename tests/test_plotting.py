"""quantsim.plotting: the one matplotlib check and the atomic PNG writer the reports share."""
import sys

import pytest

from quantsim.plotting import matplotlib_available, new_figure, save_png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_matplotlib_available_follows_the_import(monkeypatch):
    pytest.importorskip("matplotlib")
    assert matplotlib_available()
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # an environment without it
    assert not matplotlib_available()


@pytest.mark.parametrize("tight", [False, True])
@pytest.mark.parametrize("constrained", [False, True])
def test_save_png_writes_a_png_and_leaves_no_temporary(tmp_path, tight, constrained):
    pytest.importorskip("matplotlib")
    fig, ax = new_figure(3, 2, constrained=constrained)
    ax.plot([0, 1], [1, 0], label="line")
    ax.legend()
    path = tmp_path / "sub" / "figure.png"
    save_png(fig, path, tight=tight)
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in path.parent.iterdir()) == ["figure.png"]
