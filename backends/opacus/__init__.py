"""Opacus (PyTorch) DP-SGD: per-example gradients by hooks, functorch or ghost clipping."""
