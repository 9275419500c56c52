"""`samebox selftest`: a GPU self-test before long jobs: health, numerics, kernels, environment."""
