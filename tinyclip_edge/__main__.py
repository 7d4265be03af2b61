"""``python -m tinyclip_edge`` runs the CLI; torchrun needs a module or script: ``torchrun ... -m tinyclip_edge compress``."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="tinyclip-edge")
