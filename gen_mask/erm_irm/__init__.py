"""The benchmark of "Empirical or Invariant Risk Minimization? A Sample Complexity Perspective"
(Ahuja, Wang, Dhurandhar, Shanmugam and Varshney, ICLR 2021), with the gradient combiners.

- `sem`: the four linear structural-equation models and their ground truth.
- `colored`: the four Colored MNIST variants (CS, AC, CF, HB) and the MLP.
- `irm`: the IRMv1 penalty and its schedule.
- `fit`: one fit of ERM, IRMv1 or a registered combiner.
- `sweep`: the resumable sweep over methods, sizes and trials; `report`: table and plot.
Entry point: `python -m gen_mask.run_erm_irm`.
"""
