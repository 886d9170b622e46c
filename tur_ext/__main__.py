"""``python -m tur_ext`` runs the ``tur`` command line."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
