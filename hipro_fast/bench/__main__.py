"""``python -m hipro_fast.bench``: the CPU text-step benchmark (``hipro_fast.bench.cpu``)."""
import sys

from .cpu import main

sys.exit(main())
