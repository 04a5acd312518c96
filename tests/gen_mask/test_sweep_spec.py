"""Sweep files: parsing, expansion, random draws and run ids."""
import hashlib
import json
import math
import textwrap

import pytest

from and_mask.core.errors import RunError
from gen_mask.sweep.spec import PlannedRun, draw, expand, load_spec, parse_spec, run_id

ISSUE_EXAMPLE = """
module = "gen_mask.run_synthetic"
seeds = [0, 1, 2]
[flags]              # the same in every run
epochs = 20
[grid]               # every combination
method = ["mean", "and_mask", "geom_mean"]
[random]             # optional: n seeded draws, crossed with the grid
n = 4
lr = { log_uniform = [1e-4, 1e-2] }
"""


def load(tmp_path, text, name="sweep.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return load_spec(path)


def test_issue_example_expands_to_seeds_x_grid_x_draws(tmp_path):
    tasks = load(tmp_path, ISSUE_EXAMPLE)
    runs = expand(tasks)
    assert len(runs) == 3 * 3 * 4 and len({r.id for r in runs}) == 36
    assert {r.task for r in runs} == {"synthetic"}
    assert all(r.flags["epochs"] == 20 and 1e-4 <= r.flags["lr"] <= 1e-2 for r in runs)
    # the same 4 draws of lr for every method and seed (draws crossed with the grid)
    draws = {(r.seed, r.grid["method"]): [x.flags["lr"] for x in runs if (x.seed, x.grid["method"]) ==
                                         (r.seed, r.grid["method"])] for r in runs}
    assert len({tuple(v) for v in draws.values()}) == 1 and len(set(next(iter(draws.values())))) == 4
    first = runs[0]
    assert first.args == ["--epochs", "20", "--method", "mean", "--lr", str(first.flags["lr"]), "--seed", "0"]


def test_expansion_is_deterministic_and_ids_are_stable(tmp_path):
    a = expand(load(tmp_path, ISSUE_EXAMPLE, "a.toml"))
    b = expand(load(tmp_path, ISSUE_EXAMPLE, "b.toml"))
    assert [r.to_json() for r in a] == [r.to_json() for r in b]
    # The id follows its documented definition, so that a change of the hashing (which would
    # orphan every existing sweep folder) cannot pass unnoticed.
    pairs = [["epochs", "20"], ["method", "mean"], ["seed", "0"]]
    expected = hashlib.sha256(json.dumps(["gen_mask.run_synthetic", pairs]).encode()).hexdigest()[:12]
    assert run_id("gen_mask.run_synthetic", {"epochs": 20, "method": "mean", "seed": 0}) == \
        run_id("gen_mask.run_synthetic", {"seed": 0, "method": "mean", "epochs": 20}) == expected


def test_id_ignores_flag_order_paths_and_output_but_not_values():
    base = {"method": "mean", "seed": 0, "lr": 0.01}
    same = {"lr": 0.01, "seed": 0, "method": "mean", "data_path": "/x", "quiet": True}
    assert run_id("m", base) == run_id("m", same)
    assert run_id("m", base) != run_id("m", {**base, "lr": 0.02})
    assert run_id("m", base) != run_id("m", {**base, "seed": 1})
    assert run_id("m", base) != run_id("other", base)
    assert run_id("m", {**base, "flag": False}) == run_id("m", base)  # false leaves the flag out
    assert run_id("m", {**base, "flag": True}) != run_id("m", base)


def test_flag_order_in_the_file_does_not_change_ids(tmp_path):
    a = load(tmp_path, """
        module = "m"
        seeds = 2
        [flags]
        epochs = 5
        lr = 0.1
        """, "a.toml")
    b = load(tmp_path, """
        module = "m"
        seeds = [0, 1]
        [flags]
        lr = 0.1
        epochs = 5
        """, "b.toml")
    assert [r.id for r in expand(a)] == [r.id for r in expand(b)]


def test_adding_a_drawn_flag_or_more_draws_keeps_the_other_draws():
    spec = {"module": "m", "seeds": [0], "random": {"n": 3, "lr": {"log_uniform": [1e-4, 1e-1]}}}
    more = {"module": "m", "seeds": [0], "random": {"n": 5, "lr": {"log_uniform": [1e-4, 1e-1]},
                                                    "dropout_p": {"uniform": [0.0, 0.5]}}}
    lrs = [r.flags["lr"] for r in expand(parse_spec(spec))]
    more_runs = expand(parse_spec(more))
    assert [r.flags["lr"] for r in more_runs][:3] == lrs
    assert all(0 <= r.flags["dropout_p"] <= 0.5 for r in more_runs)
    reseeded = {"module": "m", "seeds": [0], "random": {"n": 3, "seed": 1, "lr": {"log_uniform": [1e-4, 1e-1]}}}
    assert [r.flags["lr"] for r in expand(parse_spec(reseeded))] != lrs


def test_distributions_stay_in_their_ranges():
    for i in range(200):
        assert 1e-4 <= draw({"log_uniform": [1e-4, 1e-2]}, 0, "lr", i) <= 1e-2
        assert -1 <= draw({"uniform": [-1, 1]}, 0, "x", i) <= 1
        value = draw({"int_uniform": [2, 4]}, 0, "k", i)
        assert isinstance(value, int) and 2 <= value <= 4
        assert draw({"choice": ["a", "b"]}, 0, "c", i) in ("a", "b")
    ints = {draw({"int_uniform": [2, 4]}, 0, "k", i) for i in range(200)}
    assert ints == {2, 3, 4}
    logs = [math.log10(draw({"log_uniform": [1e-4, 1e-2]}, 0, "lr", i)) for i in range(400)]
    assert sum(x < -3 for x in logs) == pytest.approx(200, abs=50)  # uniform in the exponent


def test_repeated_draws_of_a_choice_are_one_run():
    spec = {"module": "m", "seeds": [0], "random": {"n": 20, "method": {"choice": ["a", "b"]}}}
    runs = expand(parse_spec(spec))
    assert sorted(r.flags["method"] for r in runs) == ["a", "b"]


def test_several_tasks_with_shared_defaults(tmp_path):
    tasks = load(tmp_path, """
        seeds = [0, 1]
        [grid]
        method = ["mean", "and_mask"]
        [[task]]
        name = "spirals"
        module = "gen_mask.run_synthetic"
        flags = { epochs = 3 }
        [[task]]
        name = "sem"
        module = "gen_mask.run_erm_irm"
        seeds = [5]
        flags = { dataset = "sem_ac", trials = 2 }
        grid = { methods = ["erm", "irm"], n_train = [50, 200] }
        """)
    assert [t.name for t in tasks] == ["spirals", "sem"]
    runs = expand(tasks)
    spirals = [r for r in runs if r.task == "spirals"]
    sem = [r for r in runs if r.task == "sem"]
    assert len(spirals) == 2 * 2 and len(sem) == 1 * 2 * 2 * 2  # grid extended by the task's own
    assert all(r.seed == 5 and r.flags["trials"] == 2 for r in sem)
    assert "--n_train" in sem[0].args and sem[0].grid == {"method": "mean", "methods": "erm", "n_train": 50}


def test_tasks_take_the_top_level_module_and_any_one_line_name():
    tasks = parse_spec({"module": "m", "seeds": [0], "flags": {"a": 1},
                        "task": [{"name": "averaging, L2", "flags": {"b": 2}}, {"name": "other", "module": "n"}]})
    assert [(t.name, t.module, t.flags) for t in tasks] == [("averaging, L2", "m", {"a": 1, "b": 2}),
                                                           ("other", "n", {"a": 1})]


def test_bool_flags_and_seed_counts():
    runs = expand(parse_spec({"module": "m", "seeds": 2, "flags": {"quiet": True, "batch_norm": False}}))
    assert [r.args for r in runs] == [["--quiet", "--seed", "0"], ["--quiet", "--seed", "1"]]


def test_run_round_trips_through_json():
    run = expand(parse_spec({"module": "m", "seeds": [3], "grid": {"a": [1]},
                             "random": {"n": 1, "b": {"uniform": [0, 1]}}}))[0]
    assert PlannedRun.from_json(run.to_json()) == run


@pytest.mark.parametrize("text, message", [
    ("seeds = [0]", "`module` must name"),
    ('module = "m"', "`seeds` is missing"),
    ('module = "m"\nseeds = [0, 0]', "seeds repeat"),
    ('module = "m"\nseeds = -1', "must be positive"),
    ('module = "m"\nseeds = [0]\nepochs = 3', "unknown key(s) epochs"),
    ('module = "m"\nseeds = [0]\nflags = { seed = 1 }', "list seeds in `seeds`"),
    ('module = "m"\nseeds = [0]\nflags = { output_dir = "x" }', "the sweep sets it"),
    ('module = "m"\nseeds = [0]\nflags = { lr = [1, 2] }', "put several values in [grid]"),
    ('module = "m"\nseeds = [0]\nflags = { lr = nan }', "must be finite"),
    ('module = "m"\nseeds = [0]\ngrid = { lr = [] }', "non-empty list"),
    ('module = "m"\nseeds = [0]\nflags = { lr = 1 }\ngrid = { lr = [1, 2] }', "both in [flags] and [grid]"),
    ('module = "m"\nseeds = [0]\nrandom = { lr = { log_uniform = [1e-3, 1e-2] } }', "random.n must be"),
    ('module = "m"\nseeds = [0]\nrandom = { n = 2, lr = { log_uniform = [0, 1] } }', "positive low end"),
    ('module = "m"\nseeds = [0]\nrandom = { n = 2, lr = { uniform = [1, 0] } }', "low < high"),
    ('module = "m"\nseeds = [0]\nrandom = { n = 2, lr = { normal = [0, 1] } }', "must be one of"),
    ('module = "m"\nseeds = [0]\nrandom = { n = 2, k = { int_uniform = [0.5, 3] } }', "integer ends"),
    ('module = "m"\nseeds = [0]\nrandom = { n = 2 }', "no flag is drawn"),
    ('seeds = [0]\n[[task]]\nmodule = "m"\n[[task]]\nmodule = "m"\nflags = { a = 1 }', "task names repeat"),
    ('seeds = [0]\nname = "x"\n[[task]]\nmodule = "m"', "top level holds only"),
    ('seeds = [0]\n[[task]]\nname = "x"', "`module` must name"),
    ('seeds = [0]\nmodule = "m"\nname = ""', "one-line text"),
    ('seeds = [0]\n[[task]]\nmodule = "m"\n[[task]]\nmodule = "n"\nname = "x"\n', None),
    ('module = "m"\nseeds = [0]\n[flags\n', "not valid TOML"),
    ('module = "m"\nseeds = [0, 1]\ngrid = { m = ["a"] }\n[seeds_for.lr]\na = [0]', "a flag that [grid] varies"),
    ('module = "m"\nseeds = [0, 1]\ngrid = { m = ["a"] }\n[seeds_for.m]\nb = [0]', "b is not one of grid.m"),
    ('module = "m"\nseeds = [0, 1]\ngrid = { m = ["a"] }\n[seeds_for.m]\na = [2]', "not a subset of the task"),
    ('module = "m"\nseeds = [0, 1]\ngrid = { m = ["a"] }\n[seeds_for.m]\na = []', "seeds must be a count"),
])
def test_bad_sweep_files_give_one_line(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    if message is None:
        load_spec(path)
        return
    with pytest.raises(RunError) as error:
        load_spec(path)
    assert message in str(error.value) and "\n" not in str(error.value) and str(path) in str(error.value)


def test_two_tasks_holding_the_same_run_are_refused():
    tasks = parse_spec({"seeds": [0], "task": [{"name": "a", "module": "m"}, {"name": "b", "module": "m"}]})
    with pytest.raises(RunError, match="tasks a and b both hold the run"):
        expand(tasks)


def test_missing_sweep_file(tmp_path):
    with pytest.raises(RunError, match="cannot read the sweep file"):
        load_spec(tmp_path / "absent.toml")


def test_seeds_for_gives_some_grid_values_fewer_seeds(tmp_path):
    tasks = load(tmp_path, """
        module = "m"
        seeds = [0, 1, 2]
        [grid]
        method = ["mean", "lookahead"]
        width = [1, 2]
        [seeds_for.method]
        lookahead = [1]
        [seeds_for.width]
        2 = 2
    """)
    runs = {(r.grid["method"], r.grid["width"], r.seed) for r in expand(tasks)}
    assert runs == {("mean", 1, 0), ("mean", 1, 1), ("mean", 1, 2), ("mean", 2, 0), ("mean", 2, 1),
                    ("lookahead", 1, 1), ("lookahead", 2, 1)}  # a run takes the seeds every entry allows
    assert tasks[0].to_json()["seeds_for"] == {"method": {"lookahead": [1]}, "width": {2: [0, 1]}}
