"""The recipe library: find recipes and their models' configs, list them, diff two plans.

No torch and no jinja2: ``list`` and ``diff`` only read YAML, config.json and headers.
A recipe's base model is looked for as a local directory, then in the Hugging Face
cache, then among stored configs (``--configs DIR``: ``org__name/config.json``,
as in ``tli_recipe/_data/configs/``), so the library can be listed on a machine without weights.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from tli_recipe.errors import Problem, RecipeError, TliError
from tli_recipe.recipe.load import LoadedRecipe, load_recipe
from tli_recipe.source.checkpoint import CheckpointError, resolve_model

#: Folders under recipes/ that hold no recipes (sweeps and templates).
NOT_RECIPES = ("matrices", "templates")


#: Published config.json files of the library's base models, shipped with the package.
STORED_CONFIGS = Path(__file__).resolve().parent.parent / "_data" / "configs"


def default_configs() -> list[Path]:
    """Stored configs looked in when --configs is not given: $TLI_RECIPE_CONFIGS, else the published
    configs shipped inside the package (``tli_recipe/_data/configs``), wherever it is installed."""
    if os.environ.get("TLI_RECIPE_CONFIGS"):
        return [Path(p) for p in os.environ["TLI_RECIPE_CONFIGS"].split(os.pathsep) if p]
    return [STORED_CONFIGS]


#: The library as a wheel installs it: recipes/ and schemas/ copied into the package (see setup.py).
INSTALLED_LIBRARY = Path(__file__).resolve().parent.parent / "_data" / "library"
#: The source checkout this package runs from, if any (an editable install, PYTHONPATH).
SOURCE_CHECKOUT = Path(__file__).resolve().parents[2]


def installed_library() -> Optional[Path]:
    """The library that comes with this tli_recipe, a folder holding ``recipes/`` and ``schemas/``: the
    wheel's copy, else the checkout the package runs from; None if neither is there."""
    if (INSTALLED_LIBRARY / "recipes").is_dir():
        return INSTALLED_LIBRARY
    if (SOURCE_CHECKOUT / "recipes").is_dir() and (SOURCE_CHECKOUT / "pyproject.toml").is_file():
        return SOURCE_CHECKOUT
    return None


def library_roots() -> list[Path]:
    """Where a library name is looked up, the first match winning: the working directory when it has a
    ``recipes/`` folder (a checkout, or a user's own library), then the library installed with tli-recipe."""
    roots = [Path(".")] if Path("recipes").is_dir() else []
    installed = installed_library()
    if installed is not None and installed.resolve() != Path.cwd().resolve():
        roots.append(installed)
    return roots


#: What a name stands for, by the kind of file a command takes.
LIBRARY_NAMES = {
    "recipe": ("recipes/{}.yaml",),
    "template": ("recipes/templates/{}.yaml.j2",),
    "sweep": ("recipes/matrices/{}.yaml", "recipes/templates/{}.yaml.j2"),
}
_LIBRARY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$")


def find_in_library(arg: str, kind: str, log=None) -> str:
    """The file a command argument means: ``arg`` itself when it exists; else a library name (``tli``,
    ``qwen3-4b-k4``, ``llama``) or a path inside the library (``recipes/templates/tli.yaml.j2``) found
    in :func:`library_roots`; else ``arg`` unchanged (the command then says it is missing). ``log`` is
    told when the file comes from the installed library rather than the working directory."""
    if os.path.lexists(arg):
        return arg
    path = Path(arg)
    if _LIBRARY_NAME.match(arg) and not arg.endswith((".yaml", ".j2", ".json")):
        candidates = [pattern.format(arg) for pattern in LIBRARY_NAMES[kind]]
    elif not path.is_absolute() and path.parts[:1] in (("recipes",), ("schemas",)) and ".." not in path.parts:
        candidates = [path.as_posix()]
    else:
        return arg
    for root in library_roots():
        for candidate in candidates:
            found = root / candidate
            if found.is_file() and not found.is_symlink():
                if log is not None and root != Path("."):
                    log(f"note: {arg}: from the library installed with tli-recipe ({found})")
                return str(found) if root != Path(".") else candidate
    return arg


def from_installed_library(path: str | Path) -> bool:
    """Whether ``path`` is inside the wheel's copy of the library (site-packages: never written to)."""
    try:
        Path(path).resolve().relative_to(INSTALLED_LIBRARY)
        return True
    except ValueError:
        return False


def library_schema(near: Optional[Path] = None) -> Optional[Path]:
    """The recipe schema a recipe should link to: the one of the repository ``near`` is in (a template's
    checkout), else the installed library's."""
    for root in ([near] if near is not None else []) + [installed_library()]:
        if root is not None and (root / "schemas" / "recipe.schema.json").is_file():
            return root / "schemas" / "recipe.schema.json"
    return None


def recipe_files(paths: Iterable[str | Path]) -> list[Path]:
    """Recipe files under ``paths`` (files as given; folders searched for *.yaml, skipping matrices/ and templates/)."""
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            out += sorted(p for p in path.rglob("*.yaml") if not set(p.relative_to(path).parts[:-1]) & set(NOT_RECIPES))
        else:
            out.append(path)
    return out


def find_model(ref: Any, configs: Iterable[Path] = ()) -> tuple[Optional[Path], str]:
    """Where a model's config is: (directory, 'local model' | 'hub cache' | 'stored config'), or (None, 'not found')."""
    try:
        path = resolve_model(ref)
        return path, "local model" if Path(str(ref)).expanduser().is_dir() else "hub cache"
    except CheckpointError:
        pass
    name = str(getattr(ref, "path", ref)).replace("/", "__")
    for folder in configs:
        if (Path(folder) / name / "config.json").is_file():
            return Path(folder) / name, "stored config"
    return None, "not found"


def stored_config(ref: Any, configs: Iterable[Path] = ()) -> Optional[Path]:
    """The stored config folder (``org__name`` holding config.json) of a hub id among ``configs``; None for a
    local path or a model without one."""
    from tli_recipe.source.hub import parse_hub_id

    path = str(getattr(ref, "path", ref))
    if parse_hub_id(path) is None or Path(path).expanduser().exists():
        return None
    name = path.split("@")[0].replace("/", "__")
    for folder in configs:
        if (Path(folder) / name / "config.json").is_file():
            return Path(folder) / name
    return None


def plan_recipe(loaded: LoadedRecipe, label: str, text: Optional[str] = None, configs: Iterable[Path] = ()):
    """(Plan, where its config came from), or (None, 'not found') when the base model's config is nowhere.

    With a stored config the recipe is planned with ``--set base_model=<stored dir>``: its pin
    (revision, checksums) is not checked, the counts are those of the published config.
    """
    from tli_recipe.plan.compile import compile_plan

    path, found = find_model(loaded.recipe.base_model, configs)
    if path is None:
        return None, found
    if found == "stored config":
        loaded = load_recipe(label, [f"base_model={path}"], text=text)
    return compile_plan(loaded), found


def describe_method(recipe) -> str:
    """A short name of what a recipe does: 'TLI, K = 4', 'DUS [0, 24) + [8, 32)', ..."""
    parts = []
    if recipe.slices:
        ranges = [tuple(s.layer_range) for s in recipe.slices]
        overlap = any(a[1] > b[0] for a, b in zip(ranges, ranges[1:]))
        spans = " + ".join(f"[{a}, {b})" for a, b in ranges)
        parts.append(f"DUS {spans}" if overlap else f"slices {spans}")
    inject = recipe.inject
    if inject is not None:
        if inject.every is not None:
            site = f"K = {inject.every}"
        elif inject.after is not None:
            site = f"after {len(inject.after)} positions"
        else:
            site = f"between [{inject.between[0]}, {inject.between[1]})"
        name = "TLI" if inject.copies == 1 else "block expansion"
        copies = f", P = {inject.copies}" if inject.copies != 1 else ""
        kinds = (
            sorted({p.kind for p in inject.init.policies().values()} - {"copy", "zero", "zero_gain"})
            if inject.init
            else []
        )
        parts.append(f"{name}, {site}{copies}" + (f", init {'/'.join(kinds)}" if kinds else ""))
    widen = recipe.widen
    if widen is not None:
        sizes = [
            f"{short} {value}"
            for short, value in (
                ("hidden", widen.hidden_size),
                ("mlp", widen.intermediate_size),
                ("heads", widen.num_attention_heads),
                ("kv", widen.num_key_value_heads),
            )
            if value is not None
        ]
        parts.append(f"widen {', '.join(sizes)}")
    up = recipe.upcycle
    if up is not None:
        parts.append(f"MoE, E = {up.experts}, k = {up.top_k}" + (", other sources" if up.sources else ""))
    return " + ".join(parts) or "copy"


@dataclass
class Row:
    file: Path
    name: str
    base: str
    method: str
    layers: str
    parameters: str
    counts_from: str


def list_rows(files: Iterable[Path], configs: Iterable[Path] = ()) -> tuple[list[Row], list[Problem]]:
    """One row per recipe; problems (invalid recipes, plan errors) are returned, located."""
    from tli_recipe.plan.report import human_count

    rows, problems = [], []
    for file in files:
        try:
            loaded = load_recipe(file)
        except RecipeError as exc:
            problems += exc.problems
            continue
        recipe = loaded.recipe
        layers = parameters = "?"
        try:
            plan, found = plan_recipe(loaded, str(file), configs=configs)
        except RecipeError as exc:
            plan, found = None, "plan failed"
            problems += exc.problems
        except TliError as exc:
            plan, found = None, "plan failed"
            problems.append(loaded.marks.problem(("base_model",), str(exc)))
        if plan is not None:
            t = plan.totals
            layers = f"{t.layers_before} -> {t.layers_after}"
            parameters = f"{human_count(t.parameters_before)} -> {human_count(t.parameters_after)}"
        rows.append(
            Row(
                file,
                recipe.name or file.stem,
                str(recipe.base_model),
                describe_method(recipe),
                layers,
                parameters,
                found,
            )
        )
    return rows, problems


HEADERS = ("recipe", "base", "method", "layers", "parameters", "counts from")


def format_rows(rows: list[Row], markdown: bool = False) -> str:
    cells = [(r.name, r.base, r.method, r.layers, r.parameters, r.counts_from) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
        lines += [f"| `{r.file}` | {c[1]} | {c[2]} | {c[3]} | {c[4]} | {c[5]} |" for r, c in zip(rows, cells)]
        return "\n".join(lines)
    return format_columns([HEADERS, *cells])


def format_columns(rows: list[tuple]) -> str:
    """Rows of cells as left-aligned columns (the first row is the header)."""
    widths = [max(len(str(x)) for x in col) for col in zip(*rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in rows)


# --- diff ---------------------------------------------------------------------------

_ABSENT = object()


def _show(value: Any) -> str:
    import json

    from tli_recipe.errors import show

    if value is _ABSENT:
        return "(absent)"
    return json.dumps(value) if isinstance(value, dict) else show(value)


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            _diff(a.get(key, _ABSENT), b.get(key, _ABSENT), f"{path}.{key}" if path else str(key), out)
    elif (
        isinstance(a, list)
        and isinstance(b, list)
        and len(a) == len(b)
        and any(isinstance(x, (dict, list)) for x in a + b)
    ):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}[{i}]", out)
    elif a != b:
        out.append(f"  {path}: {_show(a)} -> {_show(b)}")


def diff_recipes(a: dict, b: dict) -> list[str]:
    """Field-by-field differences of two resolved recipes: 'inject.every: 4 -> 2' (a subtree only one
    side has is shown whole)."""
    out: list[str] = []
    _diff(a, b, "", out)
    return out


def _layer_text(plan, entry) -> str:
    from tli_recipe.plan.report import layer_policy

    src = f"{entry.source}:{entry.layer}" if len(plan.sources) > 1 else str(entry.layer)
    if entry.role == "injected":
        return f"{src}* {layer_policy(plan, entry.output)}"
    return src


def diff_layer_maps(a, b, context: int = 1) -> list[str]:
    """Side-by-side layer maps, runs of identical rows collapsed (with ``context`` rows kept around changes)."""
    n = max(len(a.layers), len(b.layers))
    left = [_layer_text(a, e) for e in a.layers] + ["-"] * (n - len(a.layers))
    right = [_layer_text(b, e) for e in b.layers] + ["-"] * (n - len(b.layers))
    changed = [i for i in range(n) if left[i] != right[i]]
    keep = {j for i in changed for j in range(i - context, i + context + 1)}
    width = max([len(x) for x in left] + [1])
    lines, skipped = [], 0
    for i in range(n):
        if i not in keep:
            skipped += 1
            continue
        if skipped:
            lines.append(f"  {'':>4}  ... {skipped} identical layer{'s' * (skipped > 1)}")
            skipped = 0
        mark = "!" if left[i] != right[i] else " "
        lines.append(f"{mark} {i:>4}  {left[i]:<{width}}  {right[i]}")
    if skipped:
        lines.append(f"  {'':>4}  ... {skipped} identical layer{'s' * (skipped > 1)}")
    return lines


def diff_plans(a, b) -> list[str]:
    """What a reviewer wants to see: totals, layer map, policies, config and stages that differ."""
    from tli_recipe.plan.report import human_count, ranges, summarize

    lines = []
    ta, tb = a.totals, b.totals
    lines.append(f"layers      {ta.layers_before} -> {ta.layers_after}   |   {tb.layers_before} -> {tb.layers_after}")
    lines.append(
        f"parameters  {human_count(ta.parameters_before)} -> {human_count(ta.parameters_after)}   |   "
        f"{human_count(tb.parameters_before)} -> {human_count(tb.parameters_after)}"
    )
    lines.append(f"injected    {summarize(a.requires_grad_layers)}   |   {summarize(b.requires_grad_layers)}")
    if a.init != b.init:
        fmt = lambda p: ", ".join(f"{k}={v}" for k, v in p.init.items()) or "none"  # noqa: E731
        lines.append(f"init        {fmt(a)}   |   {fmt(b)}")
    if a.function_preserving != b.function_preserving:
        lines.append(
            f"preserving  {'yes' if a.function_preserving else 'no'}   |   {'yes' if b.function_preserving else 'no'}"
        )
    changed = diff_layer_maps(a, b)
    if changed:
        lines += [
            "",
            "layer map (output: source layer, * injected with its init; ! differs)",
            f"  {'out':>4}  A | B",
        ] + changed
    ca = {c.key: c.after for c in a.config_changes}
    cb = {c.key: c.after for c in b.config_changes}
    config = [
        f"  {k}: {_show(ca.get(k, _ABSENT))} -> {_show(cb.get(k, _ABSENT))}"
        for k in sorted(set(ca) | set(cb))
        if ca.get(k, _ABSENT) != cb.get(k, _ABSENT)
    ]
    if config:
        lines += ["", "output config (A -> B)"] + config
    sa = {s.name: s for s in a.stages}
    sb = {s.name: s for s in b.stages}
    stages = []
    for name in list(sa) + [n for n in sb if n not in sa]:
        x, y = sa.get(name), sb.get(name)

        def describe(s):
            return (
                "(absent)"
                if s is None
                else f"layers {ranges(s.trainable_layers)}"
                + (f" + {', '.join(s.trainable_groups)}" if s.trainable_groups else "")
                + (f", LoRA r={s.lora.r}" if s.lora else "")
            )

        if describe(x) != describe(y):
            stages.append(f"  {name}: {describe(x)} -> {describe(y)}")
    if stages:
        lines += ["", "stages (A -> B)"] + stages
    return lines
