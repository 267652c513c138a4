"""Training text formats: raw text, chat JSONL (the tokenizer's chat template), instruction JSONL."""

from __future__ import annotations

import json

import pytest

from tli_recipe.training.data import DataError, read_documents


class ChatTokenizer:
    """Just what the reader uses: a chat template and apply_chat_template."""

    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"

    def apply_chat_template(self, messages, tokenize=False):
        assert tokenize is False
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)


class PlainTokenizer:
    chat_template = None


def write(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_the_three_jsonl_forms(tmp_path):
    path = write(
        tmp_path / "d.jsonl",
        {"text": "raw"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"instruction": "Add", "input": "1 2", "output": "3"},
        {"instruction": "Say yes", "output": "yes"},
    )
    assert list(read_documents(path, tokenizer=ChatTokenizer())) == [
        "raw",
        "<user>hi<assistant>hello",
        "<user>Add\n\n1 2<assistant>3",
        "<user>Say yes<assistant>yes",
    ]
    # Without a chat template, instructions take the Alpaca prompt format; chats cannot be rendered.
    alone = write(
        tmp_path / "i.jsonl",
        {"instruction": "Add", "input": "1 2", "output": "3"},
        {"instruction": "Hi", "output": "yo"},
    )
    assert list(read_documents(alone, tokenizer=PlainTokenizer())) == [
        "### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n3",
        "### Instruction:\nHi\n\n### Response:\nyo",
    ]
    with pytest.raises(DataError, match=r"d.jsonl:2: a chat .* this tokenizer has none"):
        list(read_documents(path, tokenizer=PlainTokenizer()))


def test_bad_records_name_the_line(tmp_path):
    cases = [
        ({"messages": "hi"}, "messages must be a list of"),
        ({"instruction": "x"}, "needs string fields instruction and output"),
        ({"prompt": "x"}, "no string field 'text'; expected one object per line"),
    ]
    for record, why in cases:
        path = write(tmp_path / "bad.jsonl", {"text": "ok"}, record)
        with pytest.raises(DataError, match=why) as err:
            list(read_documents(path, tokenizer=ChatTokenizer()))
        assert str(err.value).startswith(f"{path}:2: ")
