"""Hostile recipes, templates and matrices: each is refused at once with a located message.

Every case goes through the harness (``refused``): exit status 2, no traceback, the message
with its ``file:line:col``, the input folder byte-identical. The broken implementations
these catch: reading ``/dev/zero`` or a FIFO (hangs or exhausts memory), expanding YAML
aliases (a few hundred bytes take minutes and gigabytes), recursing through 5000 levels of
nesting (RecursionError), accepting NaN/infinity, unbounded counts, output_config keys
that belong to the source or the plan, and a shared matrix that writes or reads outside
its repository.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

BASE = "base_model: org/not-here\n"  # never found: validate and render need no checkpoint


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """The inputs live in ``tmp_path/in``; the command runs from ``tmp_path/cwd``."""
    inputs, cwd = tmp_path / "in", tmp_path / "cwd"
    inputs.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return inputs


def write(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# --- 1. input must be a small regular file ----------------------------------------------------


def _special(folder: Path, kind: str) -> Path:
    """A non-regular input of ``kind``: /dev/zero, a FIFO, a directory, or a symlink to one."""
    target = {"zero": Path("/dev/zero"), "fifo": folder / "pipe", "dir": folder / "adir"}[kind.removeprefix("link-")]
    if kind.endswith("fifo"):
        os.mkfifo(target)
    if kind.endswith("dir"):
        target.mkdir()
    if not kind.startswith("link-"):
        return target
    link = folder / f"{kind}.yaml"
    link.symlink_to(target)
    return link


SPECIAL = [
    ("zero", "a character device"),
    ("fifo", "a FIFO (named pipe)"),
    ("link-zero", "a character device"),
    ("link-fifo", "a FIFO (named pipe)"),
    ("link-dir", "a directory"),
]


@pytest.mark.parametrize("kind, what", SPECIAL, ids=[k for k, _ in SPECIAL])
def test_a_recipe_that_is_not_a_regular_file_is_refused_unread(folder, snapshot, hostile_cli, refused, kind, what):
    path = _special(folder, kind)
    snap = snapshot(folder)
    if kind == "link-dir":  # click refuses a directory argument itself; the loader refuses it for the API
        from tli_recipe import load_recipe
        from tli_recipe.errors import RecipeError

        with pytest.raises(RecipeError, match=f"is {what}, not a regular file"):
            load_recipe(path)
        return
    refused(hostile_cli("validate", path), f"{path}:1:1: (root): is {what}, not a regular file", inputs=snap)


@pytest.mark.parametrize("kind, what", SPECIAL, ids=[k for k, _ in SPECIAL])
def test_a_matrix_template_that_is_not_a_regular_file_is_refused(folder, snapshot, hostile_cli, refused, kind, what):
    template = _special(folder, kind)
    matrix = write(folder, "m.yaml", f"template: {os.path.relpath(template, folder)}\n")
    snap = snapshot(folder)
    if kind.endswith("zero"):  # /dev/zero (also behind a link) lies outside the matrix's repository
        what = "leaves the matrix's repository"
    refused(
        hostile_cli("variants", matrix),
        f"{matrix}:1:11: template: " if kind.endswith("zero") else f"is {what}",
        inputs=snap,
    )
    refused(hostile_cli("variants", matrix), what if kind.endswith("zero") else f"is {what}, not a regular file")


@pytest.mark.parametrize("command", ["render", "variants"])
def test_a_template_that_is_dev_zero_is_refused(folder, hostile_cli, refused, command):
    link = folder / "t.yaml.j2"
    link.symlink_to("/dev/zero")
    args = ("render", link) if command == "render" else ("variants", link, "--out-dir", folder / "out")
    refused(hostile_cli(*args), f"{link}:1:1: (root): is a character device, not a regular file")


def test_a_recipe_over_one_mib_is_refused(folder, snapshot, hostile_cli, refused):
    path = write(folder, "big.yaml", BASE + "# " + "x" * (1 << 20) + "\n")
    snap = snapshot(folder)
    refused(
        hostile_cli("validate", path),
        re.compile(
            rf"{re.escape(str(path))}:1:1: \(root\): the recipe file is \d+ bytes; "
            r"expected at most 1048576 bytes"
        ),
        inputs=snap,
    )


def test_a_template_over_one_mib_is_refused(folder, hostile_cli, refused):
    path = write(folder, "big.yaml.j2", BASE + "#" * (1 << 20))
    refused(hostile_cli("render", path), "expected at most 1048576 bytes (1 MiB)")


# --- 2. YAML aliases and merge keys ------------------------------------------------------------


def _bomb(levels: int = 9) -> str:
    """'Billion laughs': each level lists the previous one nine times (9**9 leaves, ~400 bytes)."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


ALIAS = "YAML aliases (*a0) and merge keys (<<) are not supported"


def bounded(monkeypatch, owner, name: str, limit: int) -> list:
    """Count calls of ``owner.name``; the call past ``limit`` fails the test (bounded work, not time)."""
    calls: list = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(None)
        assert len(calls) <= limit, f"{name} called more than {limit} times: the work is not bounded"
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_an_alias_bomb_recipe_is_refused_at_once(folder, snapshot, hostile_cli, refused, monkeypatch):
    from tli_recipe.recipe import load, read

    path = write(folder, "bomb.yaml", BASE + _bomb())
    snap = snapshot(folder)
    # Expanded, the 9**9 leaves would be composed and walked; refused, only the nodes before the first alias are.
    composed = bounded(monkeypatch, read.Loader, "compose_node", 100)
    walked = bounded(monkeypatch, load, "_walk", 100)
    refused(hostile_cli("validate", path), f"{path}:3:10: (root): {ALIAS}", inputs=snap)
    assert 0 < len(composed) < 20 and not walked


def test_an_alias_bomb_in_front_matter_is_refused(folder, hostile_cli, refused):
    body = "".join("  " + line + "\n" for line in _bomb().splitlines())
    path = write(folder, "t.yaml.j2", f"---\ndescription: x\nextra:\n{body}---\n{BASE}")
    refused(hostile_cli("render", path), f"{path}:5:12: (root): {ALIAS}")


def test_an_alias_bomb_rendered_by_a_template_is_refused(folder, hostile_cli, refused):
    path = write(folder, "t.yaml.j2", BASE + "extra:\n" + "".join("  " + line + "\n" for line in _bomb().splitlines()))
    refused(hostile_cli("render", path, "--configs", folder), f"<stdout>:4:12: (root): {ALIAS}")


def test_an_alias_bomb_in_a_matrix_is_refused(folder, hostile_cli, refused):
    path = write(
        folder, "m.yaml", "template: t.yaml.j2\nvars:\n" + "".join("  " + x + "\n" for x in _bomb().splitlines())
    )
    refused(hostile_cli("variants", path), f"{path}:4:12: (root): {ALIAS}")


@pytest.mark.parametrize(
    "text, where, message",
    [
        (
            "defaults: &d {every: 4}\ninject:\n  <<: *d\n",
            "4:7",
            "YAML aliases (*d) and merge keys (<<) are not supported",
        ),
        ("inject:\n  <<: {every: 4}\n", "3:3", "inject: YAML merge keys (<<) are not supported"),
        ("name: &n x\nshard_size: *n\n", "3:13", "YAML aliases (*n)"),
    ],
    ids=["merge-alias", "merge-inline", "plain-alias"],
)
def test_merge_keys_and_aliases_are_named_not_called_syntax_errors(folder, hostile_cli, refused, text, where, message):
    path = write(folder, "r.yaml", BASE + text)
    result = hostile_cli("validate", path)
    refused(result, f"{path}:{where}: ")
    refused(result, message)
    assert "fix the syntax" not in result.stderr


# --- 4. deep nesting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "[" * 5000 + "]" * 5000,
        "{a: " * 5000 + "1" + "}" * 5000,
        "".join("\n" + "  " * i + "a:" for i in range(1, 200)) + " 1",
    ],
    ids=["lists", "flow-mappings", "block-mappings"],
)
def test_deep_nesting_is_a_located_error_not_a_recursion_error(folder, snapshot, hostile_cli, refused, value):
    path = write(folder, "deep.yaml", BASE + "output_config:\n  x: " + value + "\n")
    snap = snapshot(folder)
    refused(
        hostile_cli("validate", path),
        re.compile(
            rf"{re.escape(str(path))}:\d+:\d+: \(root\): nesting is deeper "
            r"than 64 levels"
        ),
        inputs=snap,
    )


def test_deep_nesting_in_a_set_value_is_refused(folder, hostile_cli, refused):
    path = write(folder, "r.yaml", BASE)
    refused(
        hostile_cli("validate", path, "--set", "output_config.x=" + "[" * 5000 + "]" * 5000),
        "cannot parse the override (nesting is deeper than 64 levels",
    )


def test_deep_nesting_in_front_matter_is_refused(folder, hostile_cli, refused):
    path = write(folder, "t.yaml.j2", "---\ndescription: " + "[" * 5000 + "]" * 5000 + "\n---\n" + BASE)
    refused(hostile_cli("render", path), f"{path}:2:77: (root): nesting is deeper than 64 levels")


# --- 5. bytes that are not text --------------------------------------------------------------


@pytest.mark.parametrize(
    "command, name, data, where",
    [
        ("validate", "r.yaml", BASE.encode() + b"name: ab\xffc\n", "2:9"),
        ("validate", "r.yaml", BASE.encode() + b"# \xc3\xa9t\xc3\xa9 \xe2\x82\n", "2:7"),
        ("render", "t.yaml.j2", b"---\ndescription: x\n---\n" + BASE.encode() + b"name: \x80\n", "5:7"),
    ],
    ids=["recipe", "truncated-sequence", "template"],
)
def test_a_byte_that_is_not_utf8_is_located_at_its_line_and_column(
    folder, snapshot, hostile_cli, refused, command, name, data, where
):
    path = write(folder, name, data)
    snap = snapshot(folder)
    refused(
        hostile_cli(command, path),
        re.compile(
            rf"{re.escape(str(path))}:{where}: \(root\): byte 0x[0-9a-f]{{2}} is not "
            r"UTF-8 text; expected a UTF-8 file"
        ),
        inputs=snap,
    )


def test_a_control_character_is_located(folder, hostile_cli, refused):
    path = write(folder, "r.yaml", BASE + "name: a\x01b\n")
    refused(hostile_cli("validate", path), f"{path}:2:8: (root): invalid YAML: unacceptable character #x0001")


def test_an_integer_of_5000_digits_is_refused(folder, hostile_cli, refused):
    path = write(folder, "r.yaml", BASE + "seed: " + "9" * 5000 + "\n")
    refused(
        hostile_cli("validate", path),
        f"{path}:2:7: seed: cannot read this number (5000 digits); expected a number of usual size",
    )


# --- 3. non-finite numbers -----------------------------------------------------------------

NON_FINITE = [
    ("inject: {every: 4, init: {o_proj: {scale: .nan}}}", "inject.init.o_proj.scale: .nan"),
    ("inject: {every: 4, init: {o_proj: {noise: .inf}}}", "inject.init.o_proj.noise: .inf"),
    ("inject: {every: 4, init: {o_proj: {random: .inf}}}", "inject.init.o_proj.random: .inf"),
    ("inject: {every: 4, init: {o_proj: {interpolate: .nan}}}", "inject.init.o_proj.interpolate: .nan"),
    ("inject: {every: 4, lesa: {lr: .inf}}", "inject.lesa.lr: .inf"),
    ("inject: {every: 4, lesa: {norm_weight: .nan}}", "inject.lesa.norm_weight: .nan"),
    ("stages: [{name: s, trainable: [all], learning_rate: .nan}]", "stages[0].learning_rate: .nan"),
    ("stages: [{name: s, trainable: [all], weight_decay: .inf}]", "stages[0].weight_decay: .inf"),
    ("stages: [{name: s, trainable: [all], epochs: .inf}]", "stages[0].epochs: .inf"),
    ("stages: [{name: s, trainable: [all], warmup_steps: .inf}]", "stages[0].warmup_steps: .inf"),
    ("stages: [{name: s, trainable: [all], validation_fraction: -.inf}]", "stages[0].validation_fraction: -.inf"),
    (
        "stages: [{name: s, trainable: [all], lora: {r: 4, alpha: .inf, targets: [o_proj]}}]",
        "stages[0].lora.alpha: .inf",
    ),
    ("output_config: {rope_theta: .nan}", "output_config.rope_theta: .nan"),
]


@pytest.mark.parametrize("body, message", NON_FINITE, ids=[m.split(":")[0] for _, m in NON_FINITE])
def test_non_finite_numbers_are_refused_everywhere(folder, snapshot, hostile_cli, refused, body, message):
    path = write(folder, "r.yaml", BASE + body + "\n")
    snap = snapshot(folder)
    result = hostile_cli("validate", path)
    refused(
        result,
        re.compile(
            rf"{re.escape(str(path))}:2:\d+: {re.escape(message)} is not a finite number; "
            r"expected a finite number\n$"
        ),
        inputs=snap,
    )
    assert result.stderr.count("\n") == 1  # reported once, not also as a type or range error


def test_a_non_finite_set_value_is_located_in_the_override(folder, hostile_cli, refused):
    path = write(folder, "r.yaml", BASE + "stages: [{name: s, trainable: [all]}]\n")
    refused(
        hostile_cli("validate", path, "--set", "stages[0].learning_rate=.nan"),
        "--set stages[0].learning_rate=.nan: stages[0].learning_rate: .nan is not a finite number",
    )


@pytest.mark.parametrize(
    "front, var, message",
    [
        ("  lr: {type: float, default: .nan}", (), ":3:"),
        ("  lr: {type: float, default: 0.1}", ("--var", "lr=nan"), "'nan' is not a finite float"),
        ("  lr: {type: float, default: 0.1, max: .inf}", (), ".inf is not a finite number"),
    ],
    ids=["default", "var", "max"],
)
def test_non_finite_template_values_are_refused(folder, hostile_cli, refused, front, var, message):
    path = write(folder, "t.yaml.j2", f"---\nvariables:\n{front}\n---\n{BASE}seed: 1\n# {{{{ lr }}}}\n")
    refused(hostile_cli("render", path, *var), message)


# --- 6. bounds -----------------------------------------------------------------------------

BOUNDS = [
    ("inject: {every: 4, copies: 100000000}", "inject.copies: must be <= 64, got 100000000"),
    ("inject: {every: 1000000000}", "inject.every: must be <= 1024, got 1000000000"),
    (
        "inject: {after: [" + ", ".join(map(str, range(2000))) + "]}",
        "inject.after: has 2000 items; expected at most 1024",
    ),
    ("inject: {after: [5, 100000000]}", "inject.after[1]: must be < 1024, got 100000000"),
    ("inject: {between: [0, 100000000]}", "inject.between: end 100000000 is past any checkpoint's layers"),
    ("slices: [{layer_range: [0, 100000000]}]", "slices[0].layer_range: end 100000000 is past any checkpoint's layers"),
    ("slices: [" + ", ".join(["{layer_range: [0, 4]}"] * 1025) + "]", "slices: has 1025 items; expected at most 1024"),
    (
        "stages: [" + ", ".join(f"{{name: s{i}, trainable: [all]}}" for i in range(65)) + "]",
        "stages: has 65 items; expected at most 64",
    ),
    (
        "stages: [{name: s, trainable: [all], datasets: [" + ", ".join(["{path: d}"] * 257) + "]}]",
        "stages[0].datasets: has 257 items; expected at most 256",
    ),
    (
        "stages: [{name: s, trainable: [{layers: [0, 100000000]}]}]",
        "stages[0].trainable[0]: end 100000000 is past any checkpoint's layers",
    ),
]


@pytest.mark.parametrize("body, message", BOUNDS, ids=[m.split(":")[0] for _, m in BOUNDS])
def test_counts_and_lists_are_bounded_by_the_schema(folder, snapshot, hostile_cli, refused, body, message):
    path = write(folder, "r.yaml", BASE + body + "\n")
    snap = snapshot(folder)
    refused(
        hostile_cli("validate", path), re.compile(rf"{re.escape(str(path))}:2:\d+: {re.escape(message)}"), inputs=snap
    )


def test_a_matrix_grid_of_too_many_combinations_is_refused_before_rendering(folder, hostile_cli, refused, monkeypatch):
    write(
        folder,
        "t.yaml.j2",
        "---\nvariables:\n" + "".join(f"  v{i}: {{type: int}}\n" for i in range(6)) + f"---\n{BASE}",
    )
    grid = "".join(f"  v{i}: [{', '.join(map(str, range(20)))}]\n" for i in range(6))
    path = write(folder, "m.yaml", f"template: t.yaml.j2\nout_dir: out\ngrid:\n{grid}")
    from tli_recipe.library import variants

    built = bounded(monkeypatch, variants, "combinations", 0)  # counted, never built
    refused(
        hostile_cli("variants", path),
        f"{path}:3:1: grid: the grid has 20 x 20 x 20 x 20 x 20 x 20 = 64000000 combinations; expected at most 1024",
    )
    assert not built and not (folder / "out").exists()


def test_a_grid_option_of_too_many_combinations_is_refused(folder, hostile_cli, refused):
    path = write(folder, "t.yaml.j2", "---\nvariables:\n  a: {type: int}\n  b: {type: int}\n---\n" + BASE)
    values = ",".join(map(str, range(40)))
    refused(
        hostile_cli("variants", path, "--grid", f"a={values}", "--grid", f"b={values}", "--out-dir", folder / "o"),
        "the grid has 40 x 40 = 1600 combinations; expected at most 1024",
    )


# --- 7. output_config keys that belong to the source or the plan ----------------------------

CONFIG_KEYS = [
    ("a..b: 1", "output_config.a..b: 'a..b' has an empty key segment"),
    (".a: 1", "output_config..a: '.a' has an empty key segment"),
    ("a.: 1", "output_config.a.: 'a.' has an empty key segment"),
    ("auto_map: {AutoModel: evil.Model}", "output_config.auto_map: output_config cannot set or remove auto_map"),
    ("text_config.auto_map: null", "output_config.text_config.auto_map: output_config cannot set or remove auto_map"),
    ("rope_scaling: {auto_map: x}", "output_config.rope_scaling.auto_map: output_config cannot set or remove auto_map"),
    ("model_type: evil", "output_config.model_type: model_type belongs to the source checkpoint"),
    ("architectures: [EvilForCausalLM]", "output_config.architectures: architectures belongs to the source checkpoint"),
    ("num_hidden_layers: 3", "output_config.num_hidden_layers: num_hidden_layers belongs to the plan"),
    (
        "text_config.num_hidden_layers: 3",
        "output_config.text_config.num_hidden_layers: text_config.num_hidden_layers belongs to the plan",
    ),
    ("requires_grad_layers: null", "output_config.requires_grad_layers: requires_grad_layers belongs to the plan"),
    ("layer_types: [full_attention]", "output_config.layer_types: layer_types belongs to the plan"),
    (
        "text_config.layer_types: null",
        "output_config.text_config.layer_types: text_config.layer_types belongs to the plan",
    ),
    (
        "text_config: {sliding_window: 4}",
        "output_config.text_config: output_config cannot replace or remove text_config",
    ),
]


@pytest.mark.parametrize("entry, message", CONFIG_KEYS, ids=[e.split(":")[0] for e, _ in CONFIG_KEYS])
def test_output_config_keys_of_the_source_or_plan_are_refused_at_the_key(
    folder, snapshot, hostile_cli, refused, entry, message
):
    path = write(folder, "r.yaml", BASE + "inject: {every: 4}\noutput_config:\n  sliding_window: 8\n  " + entry + "\n")
    snap = snapshot(folder)
    column = 3 if "rope_scaling" not in entry else 18
    result = hostile_cli("validate", path)
    refused(result, f"{path}:5:{column}: {message}", inputs=snap)
    assert result.stderr.count("\n") == 1


def test_an_output_config_key_set_on_the_command_line_is_located_there(folder, hostile_cli, refused):
    path = write(folder, "r.yaml", BASE)
    refused(
        hostile_cli("validate", path, "--set", "output_config.model_type=evil"),
        "--set output_config.model_type=evil: output_config.model_type: model_type belongs to the source checkpoint",
    )


# --- 8. paths of a shared recipe --------------------------------------------------------------


def test_run_writes_relative_to_the_recipe_and_says_where_before_writing(
    folder, tiny, snapshot, hostile_cli, leftovers
):
    shared = folder / "shared"
    shared.mkdir()
    path = write(shared, "r.yaml", f"base_model: {tiny(layers=4)}\ninject: {{every: 2}}\noutput: ../grown\n")
    snap = snapshot(shared)
    result = hostile_cli("run", path, "--no-progress")
    assert result.exit_code == 0, result.stderr
    target = folder / "grown"
    assert result.stderr.startswith(f"output: {target.resolve()}\n")  # said before anything is written
    assert (target / "config.json").is_file() and not (Path.cwd() / "grown").exists() and not Path("../grown").exists()
    assert leftovers(target) == []
    snap.unchanged()


def test_run_with_set_output_writes_relative_to_the_working_directory(folder, tiny, hostile_cli):
    path = write(folder, "r.yaml", f"base_model: {tiny(layers=4)}\ninject: {{every: 2}}\noutput: ../grown\n")
    result = hostile_cli("run", path, "--no-progress", "--set", "output=mine")
    assert result.exit_code == 0, result.stderr
    assert (
        f"output: {(Path.cwd() / 'mine').resolve()}\n" in result.stderr
        and (Path.cwd() / "mine" / "config.json").is_file()
    )


# --- 9. a matrix stays in its repository -----------------------------------------------------

TEMPLATE = f"---\nvariables:\n  every: {{type: int, default: 4}}\n---\n{BASE}inject: {{every: {{{{ every }}}}}}\n"


@pytest.fixture
def repo(folder):
    """A git work tree ``folder/repo`` holding a template in templates/ and matrices in matrices/."""
    root = folder / "repo"
    (root / ".git").mkdir(parents=True)
    (root / "templates").mkdir()
    (root / "matrices").mkdir()
    write(root / "templates", "t.yaml.j2", TEMPLATE)
    return root


@pytest.mark.parametrize(
    "entry, key, line",
    [
        ("template: ../templates/t.yaml.j2\nout_dir: ../../../escaped", "out_dir", 2),
        ("template: ../templates/t.yaml.j2\nout_dir: /tmp/escaped-by-a-matrix", "out_dir", 2),
        ("template: ../../secret.yaml.j2\nout_dir: ../made", "template", 1),
        ("template: ../templates/t.yaml.j2\nout_dir: link/made", "out_dir", 2),
    ],
    ids=["out_dir-dotdot", "out_dir-absolute", "template-outside", "out_dir-symlink"],
)
def test_matrix_paths_that_leave_the_repository_are_refused(
    folder, repo, snapshot, hostile_cli, refused, entry, key, line
):
    write(folder, "secret.yaml.j2", "SECRET-TEMPLATE-TEXT\n" + BASE)
    (repo / "matrices" / "link").symlink_to(folder)
    matrix = write(repo / "matrices", "m.yaml", entry + "\ngrid: {every: [2, 4]}\n")
    snap = snapshot(folder)
    result = hostile_cli("variants", matrix)
    refused(
        result,
        re.compile(
            rf"{re.escape(str(matrix))}:{line}:\d+: {key}: '.*' leaves the matrix's repository "
            rf"\({re.escape(str(repo.resolve()))}\); expected a path inside it"
        ),
        inputs=snap,
    )
    assert "SECRET-TEMPLATE-TEXT" not in result.stderr + result.stdout
    assert not (folder.parent / "escaped").exists() and not Path("/tmp/escaped-by-a-matrix").exists()


def test_matrix_out_dir_given_on_the_command_line_may_leave_the_repository(folder, repo, hostile_cli):
    matrix = write(
        repo / "matrices",
        "m.yaml",
        "template: ../templates/t.yaml.j2\nout_dir: ../../../escaped\ngrid: {every: [2, 4]}\n",
    )
    chosen = folder / "chosen"
    result = hostile_cli("variants", matrix, "--out-dir", chosen, "--configs", folder)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in chosen.iterdir()) == ["t-every2.yaml", "t-every4.yaml"]


def test_matrix_paths_inside_the_repository_are_accepted(folder, repo, hostile_cli):
    matrix = write(
        repo / "matrices", "m.yaml", "template: ../templates/t.yaml.j2\nout_dir: ../recipes\ngrid: {every: [2]}\n"
    )
    result = hostile_cli("variants", matrix, "--configs", folder)
    assert result.exit_code == 0, result.stderr
    assert (repo / "recipes" / "t-every2.yaml").is_file()


def test_without_git_the_matrix_folder_is_the_repository(folder, hostile_cli, refused):
    write(folder, "t.yaml.j2", TEMPLATE)
    (folder / "sub").mkdir()
    matrix = write(folder / "sub", "m.yaml", "template: ../t.yaml.j2\n")
    refused(hostile_cli("variants", matrix), f"{matrix}:1:11: template: '../t.yaml.j2' leaves the matrix's repository")
