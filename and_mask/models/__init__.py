"""Models of the experiments."""
from and_mask.models.fastresnet import FastResnet
from and_mask.models.mlp import MLP, init_kaiming

__all__ = ["FastResnet", "MLP", "init_kaiming"]
