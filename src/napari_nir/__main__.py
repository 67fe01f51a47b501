"""``python -m napari_nir``: the ``napari-nir`` command (see napari_nir.cli)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
