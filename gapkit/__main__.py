"""``python -m gapkit`` runs the CLI (also under ``torchrun -m gapkit``)."""

from .cli import main

main()
