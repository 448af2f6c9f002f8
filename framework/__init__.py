"""A JAX training framework: models are functions over explicit parameter pytrees."""
