"""Source model references in a recipe: ``org/name``, ``org/name@revision``, a directory, or a
``{path, revision, checksums}`` mapping pinning the files. No I/O."""

from __future__ import annotations

import re
from typing import Annotated, Any, Optional

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainSerializer,
    PrivateAttr,
    field_validator,
)

from tli_recipe.recipe.base import Strict, fail

_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")

#: A Hugging Face hub model id ``org/name``, by the hub's own rules (huggingface_hub's
#: ``validate_repo_id``): each part 1 to 96 of ``A-Z a-z 0-9 . _ -``, starting and ending with a
#: letter, digit or ``_``; no ``--`` or ``..``; not ending in ``.git``. The one definition: the
#: recipe, the hub code and the model cards all ask :func:`is_hub_id`.
HUB_ID = re.compile(
    r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?/[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
)


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is a hub model id ``org/name`` (no revision)."""
    return HUB_ID.fullmatch(text) is not None and "--" not in text and ".." not in text and not text.endswith(".git")


def _check_sha256(value: str) -> str:
    if not _SHA256.match(value):
        raise fail(f"{value!r} is not a sha256; expected 64 lowercase hex digits (as sha256sum prints them)")
    return value


class ModelRef(Strict):
    """A source checkpoint, pinned to a revision and/or to the checksums of its files."""

    path: str = Field(
        min_length=1,
        description=(
            "A local directory, or a hub id (org/name) resolved through the local Hugging Face cache, or downloaded "
            "from the hub by `run` when missing."
        ),
    )
    revision: Optional[str] = Field(
        default=None,
        min_length=1,
        description=(
            "The commit the model must be at: a hub id resolves to this cache snapshot (a branch or tag name resolves "
            "through refs/ but moves: plan warns); a local directory is checked against the commit "
            "`hf download --local-dir` recorded, or its git HEAD."
        ),
    )
    checksums: dict[str, Annotated[str, AfterValidator(_check_sha256)]] = Field(
        default_factory=dict,
        description=(
            "Expected sha256 of source files by name, relative to the model directory (config.json, "
            "model-00001-of-00004.safetensors...); `run` checks them and refuses a mismatch. `tli-recipe pin MODEL` "
            "prints them."
        ),
    )
    _form: str = PrivateAttr(default="mapping")

    @field_validator("checksums")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not name or name.startswith("/") or ".." in name.split("/"):
                raise fail(
                    f"{name!r} is not a file of the model directory; expected a name relative to it, "
                    "such as config.json"
                )
        return value


class SourceRef(str):
    """A validated model reference: the string plan and checkpoint code resolve (``path`` or
    ``org/name@revision``), carrying the pin: ``path``, ``revision``, ``checksums``."""

    def __new__(
        cls,
        text: str,
        path: Optional[str] = None,
        revision: Optional[str] = None,
        checksums: Optional[dict[str, str]] = None,
        form: str = "string",
    ) -> "SourceRef":
        self = super().__new__(cls, text)
        self.path, self.revision, self.checksums, self.form = path or text, revision, dict(checksums or {}), form
        return self


def _parse_ref(value: Any) -> Any:
    if isinstance(value, (ModelRef, dict)):
        return value
    if isinstance(value, SourceRef):
        return _parse_ref(_dump_ref(value))
    if not isinstance(value, str):
        raise fail(
            f"{value!r} is not a model; expected a directory, a hub id (org/name or org/name@revision), "
            "or {path: ..., revision: ..., checksums: ...}"
        )
    if not value:
        raise fail(
            "is empty; expected a directory, a hub id (org/name or org/name@revision), or {path: ..., revision: ...}"
        )
    repo, at, revision = value.partition("@")
    ref = ModelRef(path=repo, revision=revision) if at and revision and is_hub_id(repo) else ModelRef(path=value)
    ref._form = "string"
    return ref


def _to_source_ref(ref: ModelRef) -> SourceRef:
    hub = ref.revision is not None and is_hub_id(ref.path)
    # A hub id at a revision is written id@revision, which resolve_model understands; a local
    # directory is its path (its revision is checked against the directory itself).
    text = f"{ref.path}@{ref.revision}" if hub else ref.path
    return SourceRef(text, ref.path, ref.revision, ref.checksums, ref._form)


def _dump_ref(ref: Any) -> Any:
    if getattr(ref, "form", "string") == "string" or not isinstance(ref, SourceRef):
        return str(ref)
    return {
        "path": ref.path,
        **({"revision": ref.revision} if ref.revision else {}),
        **({"checksums": dict(ref.checksums)} if ref.checksums else {}),
    }


class _RefSchema:
    def __get_pydantic_json_schema__(self, core_schema, handler):
        return {"anyOf": [{"type": "string", "minLength": 1}, handler(core_schema)]}


#: A model reference: ``org/name``, ``org/name@revision``, a directory, or a ModelRef mapping.
ModelField = Annotated[
    ModelRef, BeforeValidator(_parse_ref), AfterValidator(_to_source_ref), PlainSerializer(_dump_ref), _RefSchema()
]
