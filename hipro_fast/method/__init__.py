"""Layer 4: HiPro itself: task tree and grouping, task affinity, the model,
training, checkpoints, baselines and classifier export."""
