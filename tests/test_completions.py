"""Shell completions: the committed scripts are current, and TAB reaches the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test starts Python processes

ROOT = Path(__file__).resolve().parent.parent


def test_committed_completion_scripts_are_current(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-completions"), str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for fresh in sorted(tmp_path.iterdir()):
        committed = ROOT / "shell-completions" / fresh.name
        assert committed.exists(), f"shell-completions/{fresh.name} is missing: make completions"
        assert committed.read_text() == fresh.read_text(), (
            f"shell-completions/{fresh.name} is stale: run `make completions`"
        )
    assert {p.name for p in tmp_path.iterdir()} == {"tq.bash", "_tq", "tq.fish"}


def test_tab_completes_commands_and_options() -> None:
    """What the bash script runs at TAB: the CLI answers with candidates."""

    def complete(*words: str) -> list[str]:
        env = {
            **os.environ,
            "_TQ_COMPLETE": "complete_bash",
            "COMP_WORDS": " ".join(["tq", *words]),
            "COMP_CWORD": str(len(words)),
        }
        code = "from tq.cli.main import main; import sys; sys.argv[0] = 'tq'; main()"
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        return out.stdout.split()

    assert {"queue-depth"} <= set(complete("qu"))
    assert {"cluster-status", "cancel"} <= set(complete("c"))
    assert "--older-than" in complete("purge", "--ol")
