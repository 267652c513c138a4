"""`python -m tli_recipe ...` runs the command line (used by `accelerate launch -m tli_recipe train`)."""

from tli_recipe.cli import main

main()
