"""Task files for lm-evaluation-harness, read as data before lm-eval sees them.

A task file handed to ``--tasks`` is hostile input like a recipe: it is read with a safe YAML
loader, ``include:`` files are followed relative to the including file, and anything that would
run Python code (``!function`` tags, a ``class:`` task) is refused with its location instead of
being imported. Dataset paths (``dataset_kwargs.data_files``) are resolved against the task
file's folder, so a shipped task runs from any working directory. The result is an inline task
config (a dict) that lm-eval's ``TaskManager.load`` builds without reading the file again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from tli_recipe.errors import TliError

#: A task file is a few lines of YAML; anything far larger is not one (and is not read into memory).
MAX_TASK_FILE_BYTES = 1 << 20
MAX_INCLUDE_DEPTH = 8
TASK_SUFFIXES = (".yaml", ".yml")
NO_CODE = (
    "tli-recipe runs only data-only task files (fields or Jinja templates for doc_to_text, "
    "doc_to_choice, doc_to_target); run lm_eval itself for tasks with Python code"
)


class _CodeTag(Exception):
    def __init__(self, mark) -> None:
        super().__init__("!function")
        self.mark = mark


class _SafeLoader(yaml.SafeLoader):
    """A safe loader that knows lm-eval's ``!function`` tag only to refuse it with its location."""


def _refuse_code(loader, node):  # noqa: ARG001 - PyYAML's constructor signature
    raise _CodeTag(node.start_mark)


_SafeLoader.add_constructor("!function", _refuse_code)


def is_task_file(spec: str) -> bool:
    """A ``--tasks`` entry names a file when it ends in .yaml/.yml or contains a path separator."""
    return spec.lower().endswith(TASK_SUFFIXES) or "/" in spec


def split_specs(values) -> list[str]:
    """``["a,b", "c.yaml"]`` -> ``["a", "b", "c.yaml"]``; empty entries are an error."""
    specs = []
    for value in values:
        parts = [p.strip() for p in str(value).split(",")]
        if any(not p for p in parts):
            raise TliError(f"--tasks {value!r}: an empty task name; expected NAME[,NAME|FILE.yaml]")
        specs.extend(parts)
    if not specs:
        raise TliError("--tasks: no task given; expected NAME[,NAME|FILE.yaml]")
    return specs


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TliError(f"{path}: no such task file; expected an lm-eval task YAML")
    if path.stat().st_size > MAX_TASK_FILE_BYTES:
        raise TliError(
            f"{path}: {path.stat().st_size:,} bytes is not a task file; expected a few lines of lm-eval "
            f"task YAML (at most {MAX_TASK_FILE_BYTES:,} bytes)"
        )
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass
    except _CodeTag as tag:
        raise TliError(
            f"{path}:{tag.mark.line + 1}:{tag.mark.column + 1}: !function runs Python code from beside "
            f"the task file; {NO_CODE}"
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise TliError(
            f"{where}: not valid YAML ({exc.problem or exc.context}); expected an lm-eval task file"
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TliError(f"{path}: not readable as YAML ({type(exc).__name__}); expected an lm-eval task file") from None
    if not isinstance(data, dict):
        raise TliError(f"{path}: a {type(data).__name__} at the top level; expected a mapping with 'task: NAME'")
    return data


def _with_includes(path: Path, seen: tuple[Path, ...] = (), root: Optional[Path] = None) -> dict[str, Any]:
    """The file's mapping merged over its ``include:`` files (lm-eval's rule: the including file's keys win).

    Includes stay inside ``root``, the folder of the task file given to ``--tasks`` (links resolved):
    a shared task file must not read, or echo in an error, a file from elsewhere on the machine."""
    path = path.resolve()
    root = root or path.parent
    if path in seen:
        raise TliError(f"{seen[-1]}: include: {path} includes itself again; expected includes without a cycle")
    if len(seen) >= MAX_INCLUDE_DEPTH:
        raise TliError(f"{path}: includes nest deeper than {MAX_INCLUDE_DEPTH} files; expected a shallow include")
    data = _read_mapping(path)
    includes = data.pop("include", None)
    if includes is None:
        return data
    merged: dict[str, Any] = {}
    for name in includes if isinstance(includes, list) else [includes]:
        if not isinstance(name, str) or not name or len(name) > 4096:
            raise TliError(f"{path}: include: {_shown(name)}; expected a task file path (relative to this file)")
        target = (path.parent / name).resolve()
        if root != target and root not in target.parents:
            raise TliError(
                f"{path}: include: {_shown(name)} is outside the task's folder {root}; expected a task file "
                "inside it (copy the shared part there)"
            )
        included = _with_includes(target, (*seen, path), root)
        included.pop("task_list", None)
        merged.update(included)
    merged.update(data)
    return merged


def _shown(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _resolve_data_files(path: Path, config: dict[str, Any]) -> None:
    """Make relative ``dataset_kwargs.data_files`` absolute (against the task file) and check they exist."""
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        return
    files = kwargs["data_files"]

    def resolve(item: Any) -> Any:
        if isinstance(item, list):
            return [resolve(i) for i in item]
        if not isinstance(item, str) or not item:
            raise TliError(
                f"{path}: dataset_kwargs.data_files: {item!r}; expected file paths (relative to the task file)"
            )
        target = item if "://" in item else str((path.parent / item).resolve())
        if "://" not in item and not any(c in item for c in "*?[") and not Path(target).is_file():
            raise TliError(
                f"{path}: dataset_kwargs.data_files: {item!r} does not exist (looked for {target}); "
                "expected a data file, relative to the task file's folder"
            )
        return target

    if isinstance(files, dict):
        kwargs["data_files"] = {split: resolve(item) for split, item in files.items()}
    else:
        kwargs["data_files"] = resolve(files)


def load_task_file(path: str | Path) -> dict[str, Any]:
    """An lm-eval task file as an inline config, checked and with its data paths made absolute."""
    path = Path(path)
    config = _with_includes(path)
    if "class" in config:
        raise TliError(f"{path}: class: a Python task class; {NO_CODE}")
    name: Optional[object] = config.get("group") if "group" in config else config.get("task")
    if not isinstance(name, str) or not name.strip():
        raise TliError(
            f"{path}: task: {'missing' if name is None else repr(name)}; expected the task's name "
            "(a string, e.g. task: my_cloze)"
        )
    _resolve_data_files(path, config)
    return config
