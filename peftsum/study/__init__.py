"""The study around the pipeline: a comparison of methods against baselines, sweeps, scale, and the statistics
that decide between them."""
