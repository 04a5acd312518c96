"""Shared machinery: per-environment gradients, combiners, optimiser, training loop, flags."""
