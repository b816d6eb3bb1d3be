"""``python -m pgidem``: the command line."""

from pgidem.cli import main

main()
