"""Held-out and training text from the Python documentation (Debian's python3.11-doc).

The package ships the docs as one GNU info file; its nodes (separated by 0x1f) are the
documents; tables of contents (the Top node, indices, menu-only nodes) and nodes over
50,000 characters are dropped. Every 10th document is held out; the rest is training text. Output: JSONL files
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
#: A node longer than this (after its menus are removed) is dropped: no single document may fill a split.
MAX_NODE_CHARS = 50_000
#: A node whose text is more than this share menu entries is a table of contents, not a document.
MAX_MENU_SHARE = 0.5
_HEADER = re.compile(r"^File: [^,]+,\s+Node: (?P<node>[^,\n]+)")
_MENU_ENTRY = re.compile(r"^\* (?:[^:\n]+::|.+?:\s)")  # "* Name::" or "* Name: Node." or "* index entry:   Node."


def _strip_menus(lines: list[str]) -> tuple[list[str], int]:
    """The lines without menu entries (and their indented continuation lines, such as an index's
    "(line 304)"), and how many characters the menus held."""
    kept, menu_chars, in_entry = [], 0, False
    for line in lines:
        if line.rstrip() == "* Menu:" or _MENU_ENTRY.match(line) or (in_entry and line[:1].isspace() and line.strip()):
            menu_chars += len(line) + 1
            in_entry = line.rstrip() != "* Menu:"
            continue
        in_entry = False
        kept.append(line)
    return kept, menu_chars


def split_nodes(text: str, max_chars: int = MAX_NODE_CHARS) -> tuple[list[str], dict[str, int]]:
    """The documents of an info file's text, and how many nodes were dropped for each reason.

    Dropped: what is not a node (the preamble, the tag table), the Top node and index nodes (tables
    of contents), nodes that are mostly menu entries, nodes over ``max_chars`` after their menus
    are removed, and nodes of at most 200 characters."""
    docs, dropped = [], {"not a node": 0, "top or index": 0, "menu": 0, "too long": 0, "too short": 0}
    for node in text.split("\x1f")[1:]:
        lines = node.lstrip("\n").splitlines()
        header = _HEADER.match(lines[0]) if lines else None
        if header is None:
            dropped["not a node"] += 1
            continue
        name = header["node"].strip()
        if name == "Top" or re.search(r"\bIndex\b", name):
            dropped["top or index"] += 1
            continue
        kept, menu_chars = _strip_menus(lines[1:])
        body = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
        if menu_chars > MAX_MENU_SHARE * (menu_chars + len(body)):
            dropped["menu"] += 1
        elif len(body) > max_chars:
            dropped["too long"] += 1
        elif len(body) <= 200:
            dropped["too short"] += 1
        else:
            docs.append(body)
    return docs, dropped


def split_heldout(docs: list[str], every: int = 10) -> tuple[list[str], list[str]]:
    """(training, held-out): every ``every``-th document is held out, starting with the first."""
    return [d for i, d in enumerate(docs) if i % every], [d for i, d in enumerate(docs) if not i % every]


def nodes(path: Path, max_chars: int = MAX_NODE_CHARS) -> tuple[list[str], dict[str, int]]:
    return split_nodes(gzip.open(path, "rt", encoding="utf-8", errors="replace").read(), max_chars)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train-chars", type=int, default=4_000_000)
    ap.add_argument("--heldout-chars", type=int, default=300_000)
    ap.add_argument("--max-node-chars", type=int, default=MAX_NODE_CHARS, help="drop documents longer than this")
    args = ap.parse_args(argv)
    if not INFO.is_file():
        print(f"error: {INFO} not found; install Debian's python3.11-doc", file=sys.stderr)
        return 2
    docs, dropped = nodes(INFO, args.max_node_chars)
    print(f"{len(docs)} documents; dropped nodes: " + ", ".join(f"{n} {why}" for why, n in dropped.items()))
    train, held = split_heldout(docs)
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
