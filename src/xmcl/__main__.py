"""``python -m xmcl``: the command line (so that ``torchrun -m xmcl ...`` can launch it)."""

from xmcl.cli import main

main()
