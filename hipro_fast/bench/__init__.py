"""Benchmarks of the text engine (on the side: may import every layer but
``app``). ``python -m hipro_fast.bench`` (or ``hipro bench``) runs the CPU
text-step benchmark; ``hipro bench --device cuda`` the GPU one.

    problems   the benchmarked prompt configurations (a, b, c, L, sweep points)
    model      the frozen random-weight open_clip text tower and its tokenizer
    naive      the baseline steps (naive, padded, truncated)
    runner     one problem ready to step: forest and baseline steps, counts, verification
    counting   tokens, keys and model FLOPs per step; the counting conventions
    timing     the step timer (wall clock / CUDA events) and the GEMM-rate reference
    machine    peak resident memory, available memory, load, CPU model (/proc)
    profile    torch.profiler breakdowns and per-layer kernel times of the forest step
    output     default results folder, JSON, sweep plot, console tables
    cpu        the CPU benchmark (``hipro bench``)
    gpu        the GPU benchmark (``hipro bench --device cuda``)

The package imports none of its modules here, so ``python -m
hipro_fast.bench.gpu`` runs its module once."""
