"""Benchmarks of the text engine (on the side: may import every layer but
``app``). ``python -m hipro_fast.bench`` runs the CPU text-step benchmark."""
