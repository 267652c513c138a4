"""Held-out and training text from the Python documentation (Debian's python3.11-doc).

The package ships the docs as one GNU info file; its nodes (separated by 0x1f) are the
documents. Every 10th node is held out; the rest is training text. Output: JSONL files
with a `text` field, ready for `tli-recipe train/eval/compare --data`.

    apt-get install python3.11-doc
    python benchmarks/prepare_pydocs.py .bench/pydocs [--train-chars 4000000] [--heldout-chars 300000]
"""

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

INFO = Path("/usr/share/info/python3.11.info.gz")


def nodes(path: Path) -> list[str]:
    text = gzip.open(path, "rt", encoding="utf-8", errors="replace").read()
    docs = []
    for node in text.split("\x1f")[1:]:
        lines = node.splitlines()[2:]  # the "File: ..., Node: ..." header and its blank line
        body = "\n".join(line for line in lines if not line.startswith("* ") or "::" not in line)  # drop menu entries
        body = re.sub(r"\n{3,}", "\n\n", body).strip()
        if len(body) > 200:
            docs.append(body)
    return docs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train-chars", type=int, default=4_000_000)
    ap.add_argument("--heldout-chars", type=int, default=300_000)
    args = ap.parse_args(argv)
    if not INFO.is_file():
        print(f"error: {INFO} not found; install Debian's python3.11-doc", file=sys.stderr)
        return 2
    docs = nodes(INFO)
    train = [d for i, d in enumerate(docs) if i % 10]
    held = [d for i, d in enumerate(docs) if not i % 10]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, items, limit in (("train.jsonl", train, args.train_chars), ("heldout.jsonl", held, args.heldout_chars)):
        size = 0
        with open(args.out / name, "w") as f:
            for d in items:
                if size >= limit:
                    break
                f.write(json.dumps({"text": d}) + "\n")
                size += len(d)
        print(f"{args.out / name}: {size:,} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
