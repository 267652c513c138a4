"""Plan-time problems located in the recipe, collected and raised together."""

from __future__ import annotations

from tli_recipe.errors import Problem, RecipeError
from tli_recipe.recipe.load import LoadedRecipe


class Problems:
    """Collects plan-time problems located in the recipe; raised together at the end."""

    def __init__(self, loaded: LoadedRecipe) -> None:
        self.marks = loaded.marks
        self.items: list[Problem] = []

    def add(self, path: tuple, message: str, prefer_key: bool = False) -> None:
        self.items.append(self.marks.problem(path, message, prefer_key))

    def raise_if_any(self) -> None:
        if self.items:
            raise RecipeError(self.items)
