"""Packaging beyond pyproject.toml: the wheel carries the recipe library.

``recipes/`` (recipes, templates, matrices) and ``schemas/`` live at the top of the repository,
where people read and run them; a wheel has only the package. So building copies them into
``tli_recipe/_data/library/`` (same layout: ``../schemas/recipe.schema.json`` still resolves from a
recipe), where ``tli_recipe.library.catalog`` finds them by name when no ``recipes/`` folder is in
the working directory. An editable install needs no copy: the package finds its checkout.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: Top-level folders copied, and the files of them that belong to the library.
LIBRARY = ("recipes", "schemas")
SUFFIXES = (".yaml", ".j2", ".json")


class BuildPyWithLibrary(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "tli_recipe" / "_data" / "library"
        for folder in LIBRARY:
            for source in sorted((ROOT / folder).rglob("*")):
                if source.is_file() and not source.is_symlink() and source.name.endswith(SUFFIXES):
                    dest = target / source.relative_to(ROOT)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    self.copy_file(str(source), str(dest))


setup(cmdclass={"build_py": BuildPyWithLibrary})
