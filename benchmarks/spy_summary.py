"""Summarise a ``py-spy record -f raw`` profile: where the samples go.

    py-spy record -p <broker pid> -f raw --threads -d 20 -o broker.txt
    python benchmarks/spy_summary.py broker.txt [--top 25]

Prints the samples per thread, then the frames with the most samples on the
stack (inclusive) and at the top of the stack (self), as percentages of the
busiest thread's samples (py-spy samples a thread only while it is not idle,
unless --idle was given). A frame is ``function (file:line)`` as py-spy names it,
with the line dropped so that one function counts once per stack.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def _frame(text: str) -> str:
    return _LINE.sub(")", text.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    threads: Counter[str] = Counter()
    inclusive: Counter[tuple[str, str]] = Counter()
    own: Counter[tuple[str, str]] = Counter()
    for line in args.profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread, frames = frames[0], [_frame(f) for f in frames[1:]]
        n = int(count)
        threads[thread] += n
        for frame in set(frames):
            inclusive[thread, frame] += n
        if frames:
            own[thread, frames[-1]] += n
    busiest, total = threads.most_common(1)[0]
    print("samples per thread:")
    for thread, n in threads.most_common():
        print(f"  {n:>7}  {thread}")
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"\n{title}, % of the busiest thread's samples ({busiest}, {total}):")
        rows = [(frame, n) for (thread, frame), n in counter.most_common() if thread == busiest]
        for frame, n in rows[: args.top]:
            print(f"  {100 * n / total:5.1f} %  {frame}")


if __name__ == "__main__":
    main()
