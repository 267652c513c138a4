"""After writing, `run` re-reads every shard header: a shard safetensors would refuse never becomes the output."""

from __future__ import annotations

import os

from conftest import write_recipe


def test_a_damaged_shard_is_caught_before_the_swap(tiny, tmp_path, cli, monkeypatch):
    from tli_recipe.execute import shards

    base = tiny(layers=4)
    recipe = write_recipe(tmp_path, f"base_model: {base}\ninject: {{every: 2}}\n")
    real_close = shards.ShardWriter.close

    def close_then_truncate(self, *args):  # the writer "forgets" the last 8 bytes of the last shard
        real_close(self, *args)
        last = sorted(p for p in self.folder.iterdir() if p.suffix == ".safetensors")[-1]
        os.truncate(last, last.stat().st_size - 8)

    monkeypatch.setattr(shards.ShardWriter, "close", close_then_truncate)
    out = tmp_path / "out"
    result = cli("run", recipe, "--output", out, "--no-progress")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_an_intact_output_passes_the_check(tiny, tmp_path, cli):
    base = tiny(layers=4)
    recipe = write_recipe(tmp_path, f"base_model: {base}\ninject: {{every: 2}}\n")
    result = cli("run", recipe, "--output", tmp_path / "out", "--no-progress")
    assert result.exit_code == 0, result.output
