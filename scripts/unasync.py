"""Generate tq/client/_methods_sync.py from tq/client/_methods.py (as httpcore does).

    python scripts/unasync.py          # write the file
    python scripts/unasync.py --check  # exit 1 if it is stale

The client API is written once, async; the blocking client's copy drops
``async``/``await`` and is formatted by ruff (a dev dependency).
tests/test_client_core.py runs the check.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tq" / "client" / "_methods.py"
TARGET = ROOT / "tq" / "client" / "_methods_sync.py"
HEADER = (
    '"""GENERATED from _methods.py by scripts/unasync.py: do not edit; edit _methods.py\n'
    "and run ``python scripts/unasync.py``. The client API for ``BlockingClient``.\n"
    '"""\n'
)
RULES = [
    (r"\basync def\b", "def"),
    (r"\bawait ", ""),
    (r"\bAsyncMethods\b", "SyncMethods"),
]


def generate(source: str) -> str:
    body = source[source.index('"""', 3) + 3 :].lstrip("\n")  # drop the module docstring
    for pattern, replacement in RULES:
        body = re.sub(pattern, replacement, body)
    text = HEADER + "\n" + body
    # joined lines (a signature without ``async`` may fit one line): ruff decides
    return subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(TARGET), "-"],
        input=text,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout


def main(argv: list[str]) -> int:
    text = generate(SOURCE.read_text())
    if "--check" in argv:
        if TARGET.read_text() != text:
            print(f"{TARGET} is stale: run python scripts/unasync.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
