"""`python -m tcpidle`: the same as the `tcpidle` console script."""

from .cli import main

main()
