"""Backends: one package per framework, each imported only inside its own environment."""
