"""``python -m quantcal``: the command line."""

from quantcal.cli import main

main()
