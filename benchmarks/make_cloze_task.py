"""A multiple-choice cloze task from the Python documentation, for lm-eval (`tli-recipe eval --tasks`).

Each question is a sentence of prose from the held-out split of Debian's python3.11-doc info file
(every 10th node, the split `prepare_pydocs.py` holds out of training), with its last word
removed; the choices are that word and three distractors: words of similar length and corpus
frequency from the same documentation, drawn deterministically from `--seed`. The model scores
each choice as the continuation (lm-eval's `multiple_choice`: acc by log-likelihood, acc_norm
by log-likelihood per character).

    apt-get install python3.11-doc
    python benchmarks/make_cloze_task.py benchmarks/tasks/pydocs_cloze [--questions 400] [--seed 0]

Writes pydocs_cloze.jsonl, pydocs_cloze.yaml (the lm-eval task) and README.md (source and
licence: the Python documentation is under the PSF licence).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_pydocs import INFO, nodes  # noqa: E402 - the same nodes and split as the loss comparison

TASK = "pydocs_cloze"
WORD = re.compile(r"\b[a-z]{4,}\b")  # whole lowercase words: not "unctions" from "Functions"
NOTE = re.compile(r"\*[Nn]ote\s+(.+?):\s+[0-9a-f]+\.?")  # info cross-references: "*note len(): 1a2." -> "len()"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
CODE_CHARS = set("=[]{}<>#@$%^&|\\`~")

YAML = f"""# Cloze questions from the Python 3.11 documentation (held-out split); see README.md.
# Data paths are relative to this file (tli-recipe resolves them; plain lm_eval reads them
# relative to the working directory).
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {TASK}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

README = """# pydocs_cloze

{count} multiple-choice cloze questions for lm-evaluation-harness, written by
`benchmarks/make_cloze_task.py --questions {questions} --seed {seed}` from Debian's `python3.11-doc`
(`/usr/share/info/python3.11.info.gz`): prose sentences of the held-out info nodes (every 10th
node, the split `benchmarks/prepare_pydocs.py` keeps out of training) with their last word
removed. The choices are the removed word and three words of similar length and frequency in
the same documentation; `answer` is the index of the right one.

    tli-recipe eval MODEL... --tasks benchmarks/tasks/pydocs_cloze/pydocs_cloze.yaml

Licence: the sentences are taken from the Python 3.11 documentation, Copyright © 2001-2026
Python Software Foundation (as the info file states), under the PSF License Agreement
(`/usr/share/doc/python3.11-doc/copyright`, https://docs.python.org/3/license.html). The
questions are a derived work and keep that licence; they are not under this repository's
Apache-2.0 licence.
"""


def prose(node: str) -> list[str]:
    """The node's paragraphs that read as prose (not code, tables or headings), each on one line."""
    out = []
    for block in re.split(r"\n\s*\n", node):
        lines = [line.strip() for line in block.splitlines()]
        if len(lines) < 2 or any(line.startswith((">>>", "...", "--", "*", "(")) for line in lines):
            continue
        text = NOTE.sub(r"\1", " ".join(lines))
        if sum(c in CODE_CHARS for c in text) <= 1 and text.endswith("."):
            out.append(text)
    return out


def questions_of(node: str) -> list[tuple[str, str]]:
    """(context, answer) for every usable sentence: 8 to 40 words, mostly words, ending in a plain word."""
    found = []
    for paragraph in prose(node):
        for sentence in SENTENCE_END.split(paragraph):
            words = sentence.split()
            if not 8 <= len(words) <= 40 or not re.fullmatch(r"[a-z]{4,}\.", words[-1]):
                continue
            if re.search(r"\b(bpo|gh)-\d", sentence):  # changelog entries, not prose
                continue
            if sum(w.strip(".,;:’‘'\"").isalpha() for w in words) < 0.8 * len(words):
                continue
            found.append((" ".join(words[:-1]), words[-1][:-1]))
    return found


def distractors(answer: str, counts: Counter, rng: random.Random, n: int = 3) -> list[str]:
    """``n`` words of about the answer's length and frequency, none sharing its first four letters."""
    target = math.log(counts[answer])
    pool = [w for w, c in counts.items() if abs(len(w) - len(answer)) <= 1 and w[:4] != answer[:4] and c >= 5]
    pool.sort(key=lambda w: (abs(math.log(counts[w]) - target), w))
    return rng.sample(pool[:30], n)


def build(docs: list[str], questions: int, seed: int, per_node: int = 2) -> list[dict]:
    counts = Counter(w for d in docs for w in WORD.findall(NOTE.sub(r"\1", d)))
    held = [(i, d) for i, d in enumerate(docs) if not i % 10]
    rows, seen = [], set()
    for index, node in held:
        taken = 0
        for context, answer in questions_of(node):
            if taken >= per_node or len(rows) >= questions:
                break
            if context in seen or counts[answer] < 5:
                continue
            seen.add(context)
            rng = random.Random(f"{seed}:{context}")  # str seeds hash with sha512: the same on every run
            choices = [answer, *distractors(answer, counts, rng)]
            rng.shuffle(choices)
            rows.append(
                {
                    "id": len(rows),
                    "node": index,
                    "context": context,
                    "choices": choices,
                    "answer": choices.index(answer),
                }
            )
            taken += 1
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--questions", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not INFO.is_file():
        print(f"error: {INFO} not found; install Debian's python3.11-doc", file=sys.stderr)
        return 2
    docs, _ = nodes(INFO)
    rows = build(docs, args.questions, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"{TASK}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (args.out / f"{TASK}.yaml").write_text(YAML)
    (args.out / "README.md").write_text(README.format(count=len(rows), questions=args.questions, seed=args.seed))
    print(f"{args.out / (TASK + '.jsonl')}: {len(rows)} questions from {len({r['node'] for r in rows})} held-out nodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
