"""benchmarks/prepare_pydocs.py: info nodes -> documents, without tables of contents (no Debian package needed)."""

from __future__ import annotations

import gzip
import importlib.util
import json

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("prepare_pydocs", ROOT / "benchmarks" / "prepare_pydocs.py")
prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare)

PROSE = "The {name} module provides functions for working with {name} values. " * 6


def node(name: str, body: str) -> str:
    return f"\x1f\nFile: python.info,  Node: {name},  Next: Other,  Up: Top\n\n{body}\n"


def synthetic_info(toc_entries: int = 3000) -> str:
    """An info text shaped like python3.11.info: preamble, a huge Top menu (the detailed node
    listing), documents with a small menu, a menu-only chapter node, an index and the tag table."""
    top_menu = "".join(f"* Section {i}: Section {i}.\n" for i in range(toc_entries))
    index = "".join(
        f"* entry {i} (built-in function):       Built-in Functions.\n"
        f"                                                              (line {i})\n"
        for i in range(500)
    )
    parts = ["This is python.info, produced by makeinfo version 6.8 from python.texi.\n\n"]
    parts.append(
        node(
            "Top",
            f"Python\n******\n\n* Menu:\n\n{top_menu}\n -- The Detailed Node Listing --\n\n"
            "What's New\n\nsome words between the menus\n\n" + top_menu,
        )
    )
    parts.append(
        node(
            "The Python Tutorial",
            "The Python Tutorial\n*******************\n\nA short introduction.\n\n* Menu:\n\n"
            + "".join(f"* Tutorial part {i}:: \n" for i in range(40)),
        )
    )
    for _i, name in enumerate(
        ["json", "csv", "re", "math", "os", "sys", "time", "heapq", "array", "enum", "glob", "uuid"]
    ):
        parts.append(
            node(
                f"{name} module",
                f"{name}\n====\n\n{PROSE.format(name=name)}\n\n* Menu:\n\n* Functions:: \n* Examples:: \n\n"
                "   * a bulleted item of prose, which stays\n",
            )
        )
    parts.append(node("Built-in Functions", "Built-in Functions\n==================\n\n" + "x" * 60_000))
    parts.append(node("Index", f"Index\n*****\n\n[index]\n* Menu:\n\n{index}"))
    parts.append(
        node("Python Module Index", "Python Module Index\n*******************\n\n" + PROSE.format(name="index"))
    )
    parts.append(
        "\x1f\nTag Table:\n"
        + "".join(f"Node: Section {i}\x7f{1000 + i}\n" for i in range(50))
        + "\x1f\nEnd Tag Table\n"
    )
    return "".join(parts)


def test_tables_of_contents_indices_and_huge_nodes_are_dropped():
    docs, dropped = prepare.split_nodes(synthetic_info())
    assert len(docs) == 12 and all(d.startswith(n) for d, n in zip(docs, ["json", "csv", "re"]))
    assert dropped == {"not a node": 2, "top or index": 3, "menu": 1, "too long": 1, "too short": 0}
    assert all("* Functions::" not in d and "* Menu:" not in d for d in docs)  # menus out, prose bullets in
    assert all("   * a bulleted item of prose, which stays" in d for d in docs)
    assert max(map(len, docs)) < 1000


def test_the_held_out_split_starts_with_a_document_not_the_table_of_contents():
    docs, _ = prepare.split_nodes(synthetic_info())
    train, held = prepare.split_heldout(docs)
    assert held == [docs[0], docs[10]] and held[0].startswith("json\n") and len(train) == 10
    # What the old code did: the Top node's menus, minus only the `::` entries, came first.
    old_first = synthetic_info().split("\x1f")[1]
    assert len(old_first) > 100_000 and len(held[0]) < 1000


def test_main_writes_jsonl_from_an_info_file(tmp_path, monkeypatch, capsys):
    info = tmp_path / "python3.11.info.gz"
    with gzip.open(info, "wt", encoding="utf-8") as f:
        f.write(synthetic_info(toc_entries=50))
    monkeypatch.setattr(prepare, "INFO", info)
    assert prepare.main([str(tmp_path / "out"), "--train-chars", "1000000"]) == 0
    held = [json.loads(line)["text"] for line in (tmp_path / "out" / "heldout.jsonl").read_text().splitlines()]
    train = (tmp_path / "out" / "train.jsonl").read_text().splitlines()
    assert [h.split("\n")[0] for h in held] == ["json", "glob"] and len(train) == 10
    assert (
        "12 documents; dropped nodes: 2 not a node, 3 top or index, 1 menu, 1 too long, 0 too short"
        in capsys.readouterr().out
    )
