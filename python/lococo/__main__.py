"""`python -m lococo ...`: the same command line as the `lococo` entry point."""

from .recipes.cli import main

raise SystemExit(main())
