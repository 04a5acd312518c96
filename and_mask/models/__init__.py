"""Models of the experiments."""
from and_mask.models.mlp import MLP, init_kaiming

__all__ = ["MLP", "init_kaiming"]
