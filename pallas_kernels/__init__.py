"""Pallas kernels (import jax only, nothing from framework/); each has an XLA reference."""
