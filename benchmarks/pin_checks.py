"""What the pin checks of a local file cost, on one file of --size GiB (default 1).

Prints, medians of --repeat runs:
- the full sha256 of the file (what a file costs the first time this tool sees it, every time
  with `--rehash`, and what a blob downloaded by another tool costs once);
- the check that replaces it on later runs: a digest-cache lookup (stat of the file, the entry
  found by its identity, its HMAC verified), per file;
- the ratio of the two.
The load average is printed before and after: on a loaded machine the hash time grows.

    python benchmarks/pin_checks.py [--size 1] [--repeat 3] [--work /tmp/pin-checks]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tli_recipe.source.hashes import HashCache, sha256_file


def make_file(path: Path, size: int) -> None:
    block = os.urandom(8 * 2**20)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.write(block[: size % len(block)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=1.0, help="GiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pin-checks-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} cores")
    try:
        data = work / "weights.bin"
        size = int(args.size * 2**30)
        make_file(data, size)
        hashes = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            digest = sha256_file(data)
            hashes.append(time.perf_counter() - start)
        full = statistics.median(hashes)
        cache = HashCache(work / "sha256.json")
        cache.put(os.stat(data), digest)
        lookups = []
        for _ in range(max(args.repeat, 1) * 100):
            start = time.perf_counter()
            assert cache.get(data) == digest
            lookups.append(time.perf_counter() - start)
        check = statistics.median(lookups)
        print(f"file: {size / 2**30:.2f} GiB")
        print(
            f"full sha256 (first sight, --rehash): median {full:.2f} s of {args.repeat} "
            f"({size / 2**20 / full:.0f} MiB/s; min {min(hashes):.2f} s, max {max(hashes):.2f} s)"
        )
        print(f"digest-cache check (stat + HMAC): median {check * 1e6:.1f} us of {len(lookups)}")
        print(f"ratio full / check: {full / check:,.0f}x")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load after: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
