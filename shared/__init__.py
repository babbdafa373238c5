"""Code that several stages need: paths, atomic file writes, labels, record reading, the data cache,
input representations, the model registry and metrics. Stages import from here, never from each other."""
