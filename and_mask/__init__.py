"""AND-mask: learning explanations that are hard to vary (Parascandolo et al., ICLR 2021)."""
