"""`python -m nsa_convert` is the `nsa-convert` command."""

from nsa_convert.cli import main

main()
