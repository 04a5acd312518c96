"""The registry of gradient combiners. Adding a rule is one decorated function in this file.

    @COMBINERS.register("my_rule", hparams=[HParam("alpha", float, 0.5, "what α does", low=0)])
    def my_rule(grads, alpha=0.5):
        '''One line that --help shows. grads: (E, *shape) per-environment gradients.'''
        return grads.mean(0) * alpha, {}

Per-tensor rules (scope "tensor", the default) receive one parameter tensor's gradients stacked
as (E, *shape); whole-model rules (scope="model") receive the flattened gradients of all
parameters as (E, P). Each returns (combined gradient, diagnostics dict); a "mask" diagnostic
is logged as mask density. Every hyper-parameter becomes a --flag of the gen_mask run modules,
and the test suite checks every registered rule.
"""
from __future__ import annotations

from and_mask import and_mask_utils
from and_mask.core.combiners import CombinerRegistry, HParam, MethodFlags, apply_combiner
from and_mask.core.per_env_grads import env_losses_from_output, grads_from_output, per_env_grads

__all__ = ["COMBINERS", "HParam", "get_grads", "get_grads_from_model"]

COMBINERS = CombinerRegistry()
COMBINERS.add(and_mask_utils.AND_MASK)
COMBINERS.add(and_mask_utils.GEOM_MEAN)


@COMBINERS.register("mean", reduces_to_mean=lambda: True)
def mean(grads):
    """Plain averaging, mean_e g_e: empirical risk minimisation over the pooled environments."""
    return grads.mean(dim=0), {}


def _combine_into_params(params, grads, method, hyperparameters):
    combiner = COMBINERS[method]
    hparams = {**combiner.defaults(), **hyperparameters}
    for hp in combiner.hparams:
        problem = hp.check(hparams[hp.name])
        if problem:
            raise ValueError(problem)
    combined, diagnostics = apply_combiner(combiner, grads, hparams)
    for param, grad in zip(params, combined):
        param.grad = grad
    return diagnostics


def get_grads(batch_size, n_envs, loss_fn, params, output, target, method="mean", engine="shared", **hyperparameters):
    """Combine per-environment gradients with the registered rule `method`; writes `param.grad`.

    `output`/`target` hold n_envs × batch_size examples stacked env after env, from one forward
    pass. Returns (mean_loss, diagnostics): the mean of the environments' mean losses and one
    diagnostics dict per parameter tensor.
    """
    params = list(params)
    env_losses = env_losses_from_output(output, target, loss_fn, n_envs)
    grads = grads_from_output(env_losses, params, engine=engine)
    return env_losses.detach().mean(), _combine_into_params(params, grads, method, hyperparameters)


def get_grads_from_model(model, inputs, target, loss_fn, n_envs, method="mean", engine="auto", chunk_size=None,
                         **hyperparameters):
    """Same as `get_grads` but starting from the model, so the fast engines can be used."""
    result = per_env_grads(model, inputs, target, loss_fn, n_envs, engine=engine, chunk_size=chunk_size)
    params = [p for p in model.parameters() if p.requires_grad]
    return result.env_losses.mean(), _combine_into_params(params, result.grads, method, hyperparameters)


METHOD_FLAGS = MethodFlags(COMBINERS, required=False)
