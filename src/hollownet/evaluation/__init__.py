"""Quality: metrics, the benchmark runner, and the analysis of its results."""
