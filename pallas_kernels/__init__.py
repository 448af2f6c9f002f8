"""Pallas kernels (import jax only, nothing from framework/), each with one jnp reference."""
