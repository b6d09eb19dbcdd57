"""Entry point for `python -m recnext_cli`."""

from recnext_cli.cli import main

main()
