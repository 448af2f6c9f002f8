"""Training: optimizer, train step, metrics and plots."""
