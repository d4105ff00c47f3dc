"""Pure functions of Sparse Expansion: clustering calibration inputs, per-cluster Hessians."""
