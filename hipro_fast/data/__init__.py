"""Layer 3: what the method consumes: CLIP loading, task specs and images, the
image-feature cache, synthetic (planted) problems and the bundled data.
Imports ``engine`` and ``ops`` only, never ``method``."""
