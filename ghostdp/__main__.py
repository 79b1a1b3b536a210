"""``python -m ghostdp``: the ``ghostdp`` command line (see ``ghostdp.cli``)."""
import sys

from ghostdp.cli import main

sys.exit(main())
