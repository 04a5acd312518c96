"""The paper's Table 1 search space as a sweep file: every flag and value is one the target
module accepts, and every setting it can produce passes the module's own checks."""
import importlib
import itertools
import tomllib
from pathlib import Path

import pytest

from and_mask.experiments import synthetic
from gen_mask.gen_mask_utils import METHOD_FLAGS

SWEEP = Path(__file__).resolve().parents[2] / "gen_mask" / "sweeps" / "paper_synthetic.toml"


def tasks():
    spec = tomllib.loads(SWEEP.read_text())
    for task in spec["task"]:
        yield task["name"], task.get("module", spec["module"]), task.get("seeds", spec["seeds"]), \
            {**spec.get("flags", {}), **task.get("flags", {})}, task.get("grid", {}), task.get("random", {})


def argv_of(flags: dict) -> list:
    return [part for name, value in flags.items() for part in (f"--{name}", str(value))]


def values_of(distribution):
    """Every value a [random] distribution can give that a parser may refuse: choices, interval ends."""
    if "choice" in distribution:
        return distribution["choice"]
    low, high = distribution["log_uniform"]
    assert 0 < low < high
    return [low, high]


def settings(flags, grid, random):
    """Every grid combination with every random value tried in turn (the others at their first value)."""
    random = {k: values_of(v) for k, v in random.items() if k != "n"}
    base = {k: v[0] for k, v in random.items()}
    singles = [{**base, k: value} for k, values in random.items() for value in values] or [{}]
    for combination in itertools.product(*grid.values()):
        for single in singles:
            yield {**flags, **dict(zip(grid, combination)), **single}


@pytest.mark.parametrize("name, module, seeds, flags, grid, random", list(tasks()))
def test_every_setting_of_the_sweep_is_a_valid_run(name, module, seeds, flags, grid, random):
    assert module == "gen_mask.run_synthetic" and seeds and all(isinstance(s, int) and s >= 0 for s in seeds)
    assert "n" not in random or random["n"] >= 1
    parser = importlib.import_module(module).build_parser()
    known = {a.dest for a in parser._actions}
    names = set(flags) | set(grid) | {k for k in random if k != "n"}
    assert names <= known, f"{name}: flags the module does not have: {sorted(names - known)}"
    count = 0
    for setting in settings(flags, grid, random):
        args = parser.parse_args(argv_of(setting) + ["--seed", str(seeds[0])])
        METHOD_FLAGS.resolve(args, parser)  # a combiner's flag given to another method is refused here
        synthetic.check(args, parser)
        assert args.protocol == "paper"
        count += 1
    assert count >= 1


def test_the_search_covers_table_1_and_the_best_setting():
    by_name = {name: (flags, random) for name, _, _, flags, _, random in tasks()}
    table_1 = {"n_hidden_units": [256, 512], "n_hidden_layers": [3, 5], "batch_size": [64, 128, 256],
               "lr": [1e-3, 1e-2, 1e-1], "batch_norm": [0, 1], "dropout_p": [0.0, 0.5]}
    # Table 2: IRM searches a wider learning rate, its penalty weight and its annealing.
    table_2 = {**table_1, "lr": [1e-3, 1e-2, 1e-1, 1.0], "irm_penalty_weight": [10.0, 100.0, 1000.0],
               "irm_anneal_steps": [0, 1, 2, 4, 8]}
    for name, (flags, random) in by_name.items():
        if "best" in name:
            continue
        table = table_2 if flags["method"] == "irm" else table_1
        assert {k: random[k]["choice"] for k in table} == table, name
        penalties = {k for k in ("weight_decay", "l1_coef") if k in random}
        assert len(penalties) <= 1 and all(flags.get(k) == 0.0 for k in {"weight_decay", "l1_coef"} - penalties)
    best, _ = by_name["AND-mask, the paper's best setting"]
    assert (best["agreement_threshold"], best["lr"], best["weight_decay"], best["batch_size"]) == (1.0, 1e-2, 1e-4, 128)
