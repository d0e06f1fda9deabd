"""`python -m pcp.cli`: the same as the `pcp` command."""

from pcp.cli import main

main()
