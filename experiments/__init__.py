"""fastzoo experiments: benchmarks and evaluations that reproduce the figures in the README."""
