"""GEN-mask: a registry of rules for combining per-environment gradients."""
