"""``python -m ghostdp.integrations.bench``: the same as ``ghostdp bench``."""
import sys

from ghostdp.integrations.bench.cli import main

sys.exit(main())
