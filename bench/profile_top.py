"""The top of a py-spy ``--format raw`` profile: time per thread, self time, inclusive time.

python bench/profile_top.py /tmp/profiles/load1.txt [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path


def frame_name(frame: str) -> str:
    """``function (path/to/file.py:12)`` → ``function (file.py:12)``."""
    return re.sub(r"\((?:[^()]*/)?([^/()]+:\d+)\)", r"(\1)", frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    threads: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in args.profile.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        thread, *frames = stack.split(";")
        threads[re.sub(r"\s*\(\d+\)|0x[0-9a-f]+", "", thread)] += count
        total += count
        names = [frame_name(f) for f in frames]
        if names:
            own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    print(f"{total} samples")
    for title, counter in (("threads", threads), ("self", own), ("inclusive", inclusive)):
        print(f"-- {title}")
        for name, count in counter.most_common(args.top):
            print(f"  {count / total:6.1%}  {name}")


if __name__ == "__main__":
    main()
