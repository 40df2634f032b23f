"""Our own DP-SGD in JAX: jit-compiled per-example gradients, clipping, Gaussian noise."""
