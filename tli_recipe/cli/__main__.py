"""`python -m tli_recipe.cli ...`: the same as `python -m tli_recipe ...`."""

from tli_recipe.cli import main

main()
