"""The four Colored MNIST variants of Ahuja et al. (ICLR 2021) and their fitting problem.

Every image becomes a binary 28×28 mask m = 1[pixel > 127] with label y = 1[class ≥ 5] (MNIST
digits 5-9; Fashion-MNIST classes sandal, shirt, sneaker, bag, ankle boot). An environment has a
colour parameter p (training: 0.2 and 0.1; test: 0.9); the mask is written into channel z
(the colour) of C channels, all other channels 0, and flattened to C·784 inputs. With ⊕ the
exclusive or and Bern(q) an independent coin per example:

- CS (covariate shift, C = 3): target y (clean); colour c ~ Bern(0.5); the example is kept with
  probability 1 − p if c = y, else p. About half are dropped; among the kept P(c = y) = 1 − p.
  Optimal invariant error 0 (the shape determines the label).
- AC (anti-causal, C = 2): target y' = y ⊕ h, h ~ Bern(0.25); colour z = y' ⊕ Bern(p).
- CF (confounded, C = 2): target y' = y ⊕ h; colour z = h ⊕ Bern(p): the colour tells whether
  the label was flipped.
- HB (hybrid, C = 2): target y' = y ⊕ h; per example w ~ Bern(0.8), colour as in AC if w = 1,
  as in CF if w = 0.
For AC, CF and HB the best invariant predictor uses the shape only, with error 0.25 (the label
noise). These optima assume the shape determines the class, true of MNIST digits and only
approximately of binarised Fashion-MNIST items.

Training data: `n_train` images drawn without replacement from the training split, split into
two halves (p = 0.2, 0.1), each then shuffled and split into training and validation parts
(val_fraction, IRM's choice of penalty weight). Test: the whole test split with p = 0.9.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from and_mask.core.errors import RunError
from and_mask.datasets.mnist import load_mnist
from gen_mask.erm_irm.fit import Problem, trial_seed

VARIANTS = {"cs_cmnist": 3, "ac_cmnist": 2, "cf_cmnist": 2, "hb_cmnist": 2}  # name -> channels
OPTIMAL_ERROR = {"cs_cmnist": 0.0, "ac_cmnist": 0.25, "cf_cmnist": 0.25, "hb_cmnist": 0.25}
TRAIN_COLOUR_FLIPS = (0.2, 0.1)
TEST_COLOUR_FLIP = 0.9
LABEL_NOISE = 0.25
AC_SHARE_IN_HB = 0.8
PIXEL_THRESHOLD = 127
HIDDEN_UNITS = 390
EVAL_CHUNK = 4096


@lru_cache(maxsize=4)
def binary_images(image_data: str, data_path: str | None, train: bool):
    """(masks bool (N, 784), binary labels int64 (N,)) of a split of MNIST or Fashion-MNIST."""
    images, classes = load_mnist(image_data, data_path, train=train)
    return (images > PIXEL_THRESHOLD).reshape(len(images), -1), (classes >= 5).long()


@dataclass
class ColoredEnv:
    inputs: torch.Tensor  # (N, C·784) float
    target: torch.Tensor  # (N,) float, the label the model is trained and scored on
    colour: torch.Tensor  # (N,) int64, the channel holding the mask
    clean: torch.Tensor  # (N,) int64, y before label noise
    from_ac: torch.Tensor | None  # (N,) bool, HB only: colour drawn as in AC
    kept_fraction: float  # CS: fraction of the examples kept; 1 otherwise


def _coin(q: float, n: int, generator) -> torch.Tensor:
    return (torch.rand(n, generator=generator) < q).long()


def colour_env(variant: str, masks, labels, p: float, generator: torch.Generator) -> ColoredEnv:
    """Apply `variant`'s colouring mechanism with colour parameter p to masks/labels (see module)."""
    n = len(labels)
    from_ac = None
    kept = torch.ones(n, dtype=torch.bool)
    if variant == "cs_cmnist":
        colour = _coin(0.5, n, generator)
        keep_prob = torch.where(colour == labels, 1 - p, p)
        kept = torch.rand(n, generator=generator) < keep_prob
        target = labels
    else:
        flipped = _coin(LABEL_NOISE, n, generator)
        target = labels ^ flipped
        ac_colour = target ^ _coin(p, n, generator)
        cf_colour = flipped ^ _coin(p, n, generator)
        if variant == "ac_cmnist":
            colour = ac_colour
        elif variant == "cf_cmnist":
            colour = cf_colour
        else:
            from_ac = _coin(AC_SHARE_IN_HB, n, generator).bool()
            colour = torch.where(from_ac, ac_colour, cf_colour)
            from_ac = from_ac[kept]
    masks, colour, target, clean = masks[kept], colour[kept], target[kept], labels[kept]
    inputs = torch.zeros(len(masks), VARIANTS[variant], masks.shape[1])
    inputs[torch.arange(len(masks)), colour] = masks.float()
    return ColoredEnv(inputs.flatten(1), target.float(), colour, clean, from_ac, float(kept.float().mean()))


class BinaryMLP(nn.Sequential):
    """Linear(d → 390), ReLU, Linear(390 → 390), ReLU, Linear(390 → 1): one logit per example.

    Xavier-uniform weights and zero biases, as in the IRM reference code.
    """

    def __init__(self, n_inputs: int, hidden: int = HIDDEN_UNITS):
        super().__init__(nn.Linear(n_inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1), nn.Flatten(0))
        for module in self:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)


def env_batches(sizes: list[int], batch_size: int, steps: int, generator) -> tuple[int, list]:
    """Per-environment example indices of every step: (b, [(steps, b) index tensor per env]).

    Every step takes b = min(batch_size // E, smallest environment) examples from each
    environment (per_env_grads needs equal sizes), walking through fresh random permutations of
    each environment, so every example is used once before any is reused.
    """
    per_env = min(batch_size // len(sizes), min(sizes))
    schedule = []
    for size in sizes:
        n_perms = -(-steps * per_env // size)
        stream = torch.cat([torch.randperm(size, generator=generator) for _ in range(n_perms)])
        schedule.append(stream[:steps * per_env].view(steps, per_env))
    return per_env, schedule


@torch.no_grad()
def error_rate(model, inputs, target) -> torch.Tensor:
    """Fraction of examples with (logit ≥ 0) ≠ target."""
    wrong = sum(int(((model(x) >= 0).float() != t).sum())
                for x, t in zip(inputs.split(EVAL_CHUNK), target.split(EVAL_CHUNK)))
    return torch.tensor(wrong / max(len(target), 1))


def colored_problem(variant, n_train, trial, seed, steps, batch_size, val_fraction, image_data, data_path=None):
    """The fitting Problem of one (variant, n_train, trial): data, MLP, minibatches, metrics."""
    train_masks, train_labels = binary_images(image_data, data_path, True)
    test_masks, test_labels = binary_images(image_data, data_path, False)
    if n_train > len(train_labels):
        raise RunError(f"--n_train {n_train} exceeds the {len(train_labels)} training images of {image_data}")
    generator = torch.Generator().manual_seed(trial_seed(seed, trial, n_train))
    drawn = torch.randperm(len(train_labels), generator=generator)[:n_train]
    train, val = [], []
    for p, idx in zip(TRAIN_COLOUR_FLIPS, drawn.chunk(len(TRAIN_COLOUR_FLIPS))):
        env = colour_env(variant, train_masks[idx], train_labels[idx], p, generator)
        order = torch.randperm(len(env.target), generator=generator)
        n_val = int(round(val_fraction * len(order)))
        train.append((env.inputs[order[n_val:]], env.target[order[n_val:]]))
        val.append((env.inputs[order[:n_val]], env.target[order[:n_val]]))
    if min(len(t) for _, t in train) == 0:
        raise RunError(f"--n_train {n_train} leaves an empty training environment for {variant}")
    test = colour_env(variant, test_masks, test_labels, TEST_COLOUR_FLIP, generator)
    val_inputs, val_target = torch.cat([v[0] for v in val]), torch.cat([v[1] for v in val])
    _, schedule = env_batches([len(t) for _, t in train], batch_size, steps, generator)
    init_seed = trial_seed(seed, trial, n_train, 1)

    def make_model():
        with torch.random.fork_rng():
            torch.manual_seed(init_seed)
            return BinaryMLP(train[0][0].shape[1])

    def batch(step):
        return (torch.cat([x[idx[step]] for (x, _), idx in zip(train, schedule)]),
                torch.cat([y[idx[step]] for (_, y), idx in zip(train, schedule)]))

    return Problem(
        make_model=make_model, stacked=False, risk=F.binary_cross_entropy_with_logits, batch=batch,
        n_envs=len(train),
        validation_loss=lambda model: error_rate(model, val_inputs, val_target),
        test_error=lambda model: error_rate(model, test.inputs, test.target),
        squared_norm=lambda model: sum(p.pow(2).sum() for p in model.parameters()),
    )
