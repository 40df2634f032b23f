"""dpbench: identical DP-SGD workloads through every backend; the core imports no framework."""

__version__ = "0.1.0"
