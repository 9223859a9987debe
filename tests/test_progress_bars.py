"""Progress bars of the folder commands: on a terminal, and only there; never with --json.

One command runs in a child process with its stderr on a real pseudo-terminal (and once on a
pipe); the others run in-process with a stderr that says it is a terminal, so the CLI's own
isatty decision is what is tested.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from qualiteacher.pipelines import cli

from qualiteacher.imageio import write_png

REPO = Path(__file__).resolve().parent.parent
BAR = "img/s"  # tqdm's rate unit for our bars ("img"); absent from every other output


class Terminal(io.StringIO):
    """A stderr that says it is a terminal (what `qualiteacher.progress.on_terminal` reads)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "in"
    rng = np.random.default_rng(0)
    for i in range(3):
        base = np.linspace(0, 255, 96)[None, :, None] * np.ones((96, 1, 3))
        write_png(folder / f"p{i}.png", np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
    return folder


def _on_pty(args: list[str]) -> str:
    """Run the CLI with stderr on a pseudo-terminal; what the terminal showed."""
    leader, follower = pty.openpty()
    # A terminal has a size; tqdm draws nothing in 0 columns.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "qualiteacher.pipelines.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    assert proc.wait(timeout=120) == 0
    os.close(leader)
    return shown.decode(errors="replace")


def test_degrade_bar_on_a_pty_and_not_on_a_pipe(photos, tmp_path):
    args = ["degrade", "--task", "haze", str(photos)]
    shown = _on_pty([*args, str(tmp_path / "a")])
    assert "degrading" in shown and BAR in shown and "/3 [" in shown
    piped = subprocess.run([sys.executable, "-m", "qualiteacher.pipelines.cli", *args, str(tmp_path / "b")], cwd=REPO,
                           capture_output=True, text=True, timeout=120, check=True)
    assert piped.stderr == "" and "degraded 3 of 3 images" in piped.stdout
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["p0.png", "p1.png", "p2.png"]


def _run(monkeypatch, capsys, argv: list[str]) -> tuple[str, str]:
    """`qualiteacher ARGV` in-process with a terminal for stderr: (stdout, what stderr showed)."""
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert cli.main(argv) == 0
    return capsys.readouterr().out, term.getvalue()


@pytest.mark.parametrize("command", ["score", "evaluate"])
def test_scoring_bars_on_a_terminal_quiet_with_json(command, photos, weights_dir, monkeypatch, capsys):
    argv = (["score", str(photos)] if command == "score" else ["evaluate", "--pred", str(photos)])
    argv += ["--weights-dir", str(weights_dir), "--metrics", "brisque"]
    out, err = _run(monkeypatch, capsys, argv)
    assert "scoring" in err and BAR in err and "/3 [" in err
    out, err = _run(monkeypatch, capsys, [*argv, "--json"])
    assert err == ""
    json.loads(out)  # stdout is the JSON document alone


def test_restore_bar_on_a_terminal(photos, tmp_path, monkeypatch, capsys):
    from tests.test_pretrain_restore import tiny_model_file

    model = tiny_model_file(tmp_path / "m.pt")
    out, err = _run(monkeypatch, capsys, ["restore", "--checkpoint", str(model), str(photos), str(tmp_path / "out")])
    assert "restoring" in err and BAR in err and "restored 3 of 3" in out
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert cli.main(["restore", "--checkpoint", str(model), str(photos), str(tmp_path / "out2")]) == 0
    assert sys.stderr.getvalue() == ""
