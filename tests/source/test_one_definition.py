"""One definition of each fact about a source reference: the hub-id rule and the revision rule
are each asked in one place, and every caller (recipe, hub, model cards, cache) gets the same answer."""

from __future__ import annotations

import pytest

from tli_recipe.errors import TliError
from tli_recipe.recipe.sources import is_hub_id
from tli_recipe.source.hub import check_revision, parse_hub_id
from tli_recipe.source.revisions import hub_commit, valid_revision

GOOD_IDS = [
    "org/name",
    "meta-llama/Meta-Llama-3-8B",
    "HuggingFaceTB/SmolLM2-135M",
    "a_b/c.d-e",
    "_x/y_",
    "o/" + "n" * 96,
]
BAD_IDS = [
    "org",  # no namespace: the tool asks for org/name
    "org/name/extra",
    "org/.hidden",  # a part starts with "."
    "org/-dash",
    "org/name-",  # or ends with "-" or "."
    "org/name.",
    "org/a--b",  # "--" is the cache's separator (models--org--name)
    "org/a..b",
    "org/..",
    "org/name.git",
    "org/name\n",  # no trailing newline sneaks through a "$"
    "o/" + "n" * 97,  # at most 96 characters per part
    "org/näme",
    "",
]


@pytest.mark.parametrize("text", GOOD_IDS)
def test_hub_ids_the_hub_accepts(text):
    assert is_hub_id(text) and parse_hub_id(text) == (text, "main")


@pytest.mark.parametrize("text", BAD_IDS)
def test_hub_ids_the_hub_refuses_are_no_hub_ids_anywhere(text):
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    assert not is_hub_id(text) and parse_hub_id(text) is None
    if text.count("/") == 1 and text != "org/name\n":  # the same verdict as huggingface_hub's own check
        with pytest.raises(HFValidationError):
            validate_repo_id(text)


def test_the_recipe_reads_org_name_at_revision_by_the_same_rule():
    from pydantic import TypeAdapter

    from tli_recipe.recipe.sources import ModelField

    field = TypeAdapter(ModelField)
    assert field.validate_python("org/name@abc").revision == "abc"
    assert field.validate_python("org/a--b@abc").revision is None  # not a hub id: a path that contains "@"


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/1", "a" * 40, "release/2024-01"])
def test_revisions(revision, tmp_path):
    assert valid_revision(revision)
    check_revision("org/name", "org/name", revision)
    assert hub_commit(tmp_path, revision) == revision  # no refs/: the name is the snapshot's


@pytest.mark.parametrize("revision", ["..", "a/../b", "/abs", "a//b", "x" * 201, "main\n", "a b", ""])
def test_bad_revisions_are_refused_by_both_callers(revision, tmp_path):
    assert not valid_revision(revision)
    assert hub_commit(tmp_path, revision) is None
    with pytest.raises(TliError):
        check_revision("org/name@x", "org/name", revision)
