"""``python -m hipro_fast.bench``: the CPU text-step benchmark (see ``text_step``)."""
import sys

from .text_step import main

sys.exit(main())
