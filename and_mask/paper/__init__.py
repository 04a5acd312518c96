"""The paper's analyses, each a command that writes a figure and a table into --out.

- `masked_noise`: Proposition 2 / Fig. 4, the AND-masked mean of random Gaussian gradients.
- `env_count`: Fig. 15, averaging against AND-mask as the number of training environments grows.
- `memorization`: Fig. 8 / 16, the AND-mask threshold on true and on random labels (CIFAR-10 protocol).
- `label_noise`: Fig. 9, 25 % noisy labels: accuracy on the relabelled images and on the test set.
- `synthetic_results`: the paper's synthetic protocol for a list of methods over seeds.

The training analyses run each point as an ordinary training run of a `run_*` module: all of an
analysis' runs are one sweep in --out (OUT/sweep.toml, run by `python -m gen_mask.sweep`; `runs.py`),
so an interrupted analysis resumes where it stopped and --workers trains several runs at once.
"""
