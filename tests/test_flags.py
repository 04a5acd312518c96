"""The flag surface of every entry point: help that states the real defaults, numbers that are checked.

Generic over `tests/support/entry_points.py::ENTRY_POINTS`, so an entry point added later is covered too.
"""
import argparse
import importlib
import math
import re

import pytest
import torch

from and_mask.core import cli, flags
from and_mask.core.combiners import CombinerRegistry, HParam, MethodFlags
from and_mask.core.errors import RunError
from and_mask.core.flags import MAX_SEED
from gen_mask import run_erm_irm
from gen_mask.gen_mask_utils import COMBINERS, get_grads
from gen_mask.gen_mask_utils import METHOD_FLAGS as GEN_MASK_FLAGS
from tests.support.entry_points import ENTRY_POINTS, parser_of, required_argv
from vizualization.toy_methods import TOY_METHODS

NON_FINITE = ["nan", "inf", "-inf"]
HPARAM_NAMES = {h.name for combiner in TOY_METHODS.values() for h in combiner.hparams}


def options(parser):
    """Every optional flag but --help."""
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def printed_help(parser, action) -> str:
    """The help text --help prints for `action`, before line wrapping."""
    return parser._get_formatter()._expand_help(action)


def numeric(action) -> bool:
    """True when the flag's type parses numbers: it rejects a word."""
    if action.type is None:
        return False
    try:
        action.type("word")
    except (ValueError, argparse.ArgumentTypeError):
        return True
    return False


def parse_error(parser, argv, capsys) -> str:
    """The one-line argparse error of `argv` (exit status 2)."""
    with pytest.raises(SystemExit) as done:
        parser.parse_args(argv)
    assert done.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"{parser.prog}: error: "), lines
    return lines[-1]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_descriptions_and_helps_are_whole_sentences(module):
    parser = parser_of(module)
    assert parser.formatter_class is flags.HelpFormatter
    assert parser.description and parser.description[-1] in ".?!" and "\n" not in parser.description
    for action in parser._actions:
        assert action.help and action.help[-1] in ".?!", f"{action.dest}: {action.help!r}"


def test_hyper_parameter_helps_are_whole_sentences():
    """Each method's flag help is its HParams' helps joined, then "Used by ...": each must be a sentence."""
    for name in [*GEN_MASK_FLAGS.registry, *GEN_MASK_FLAGS.objectives]:
        for hp in GEN_MASK_FLAGS.entry(name).hparams:
            assert hp.help[-1] in ".?!", f"{name} --{hp.name}: {hp.help!r}"


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_states_each_flag_s_real_default(module):
    parser = parser_of(module)
    base = required_argv(parser)
    defaults = parser.parse_args(base)
    for action in options(parser):
        flag, printed = action.option_strings[0], printed_help(parser, action)
        if action.default is None:  # the help says in words what happens without the flag
            assert action.help.count("Default: ") == 1 or action.required, f"{flag}: {action.help!r}"
            assert printed == action.help
            continue
        assert "default" not in action.help.lower(), f"{flag} writes its default by hand: {action.help!r}"
        if action.nargs == 0:  # a switch: absent means off
            assert printed == action.help
            continue
        stated = re.fullmatch(r"(?s).* Default: (.+)\.", printed)
        assert stated, f"{flag}: {printed!r}"
        if action.nargs in (None, "?"):
            argv = [f"{flag}={stated.group(1)}"]  # "=": a value may start with "-"
        else:
            argv = [flag, *stated.group(1).split(" ")]
        given = parser.parse_args(base + argv)
        assert getattr(given, action.dest) == getattr(defaults, action.dest), flag


def test_defaults_that_an_experiment_changes_are_the_ones_shown():
    colored = parser_of("and_mask.run_colored_mnist")
    cifar = parser_of("and_mask.run_cifar")
    assert colored.get_default("use_cuda") == "0"
    assert printed_help(colored, _action(colored, "use_cuda")).endswith("Default: 0.")
    assert cifar.get_default("grad_chunk_size") == 16
    assert printed_help(cifar, _action(cifar, "grad_chunk_size")).endswith("Default: 16.")
    synthetic = parser_of("and_mask.run_synthetic")
    assert "one at a time on the CPU" in _action(synthetic, "grad_chunk_size").help
    for parser in (colored, cifar):  # required, as in the original, and the usage says so
        assert _action(parser, "output_dir").required
    assert not _action(synthetic, "output_dir").required


def _action(parser, dest):
    return next(a for a in parser._actions if a.dest == dest)


@pytest.mark.parametrize("module,method_flags", [
    ("gen_mask.run_synthetic", "gen_mask.gen_mask_utils"),
    ("gen_mask.run_cifar", "gen_mask.gen_mask_utils"),
    ("vizualization.toy_landscape", "vizualization.toy_landscape"),
])
def test_combiner_flag_help_gives_each_method_s_own_default(module, method_flags):
    parser, flags = parser_of(module), importlib.import_module(method_flags).METHOD_FLAGS
    checked = 0
    for action in options(parser):
        stated = re.search(r"Default: the chosen method's own value \((.+)\)\.$", action.help)
        if not stated:
            continue
        for pair in stated.group(1).split(", "):
            method, value = pair.split(" ")
            args = parser.parse_args(required_argv(parser) + ["--method", method])
            _, hparams = flags.resolve(args, parser)
            assert hparams[action.dest] == action.type(value), (action.dest, method)
            checked += 1
    assert checked >= 4


def test_erm_irm_defaults_per_kind_of_data_set_are_the_ones_applied(tmp_path):
    parser = run_erm_irm.build_parser()
    per_kind = [a for a in parser._actions if a.help and "for the SEMs" in a.help]
    assert {a.dest for a in per_kind} == {"n_train", "trials", "steps", "lr", "l2"}
    for dataset, kind in (("sem_hb", 1), ("hb_cmnist", 2)):
        args, _ = run_erm_irm.parse(["--dataset", dataset, "--out", str(tmp_path / "out")])
        for action in per_kind:
            stated = re.search(r"Default: (\S+) for the SEMs, (\S+) for Colored MNIST\.$", action.help).group(kind)
            applied = getattr(args, action.dest)
            assert action.type(stated) == (tuple(applied) if isinstance(applied, list) else applied), action.dest
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_non_finite_numbers_are_rejected_with_one_line(module, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    parser = parser_of(module)
    base = required_argv(parser)
    for action in filter(numeric, options(parser)):
        flag = action.option_strings[0]
        for bad in NON_FINITE:
            with pytest.raises((ValueError, argparse.ArgumentTypeError)):
                action.type(bad)
            n_values = action.nargs if isinstance(action.nargs, int) else 1
            # `--flag=-inf`: a value that starts with "-" is otherwise read as a flag
            argv = [f"{flag}={bad}"] if n_values == 1 else [flag, *["1"] * (n_values - 1), bad]
            assert f"argument {flag}" in parse_error(parser, base + argv, capsys)
    assert not any(tmp_path.iterdir())


def test_every_float_flag_is_checked():
    """No entry point has a raw `type=float` flag (it would take NaN and ±inf)."""
    for module in ENTRY_POINTS:
        for action in options(parser_of(module)):
            assert action.type is not float, f"{module} {action.option_strings[0]}"


@pytest.mark.parametrize("module", [m for m in ENTRY_POINTS if any(a.dest == "seed" for a in parser_of(m)._actions)])
def test_seeds_outside_numpy_s_range_are_rejected(module, capsys):
    parser = parser_of(module)
    base = required_argv(parser)
    for bad in ("-1", str(MAX_SEED + 1), "1.5"):
        assert "--seed" in parse_error(parser, base + [f"--seed={bad}"], capsys)
    assert parser.parse_args(base + ["--seed", str(MAX_SEED)]).seed == MAX_SEED


def test_the_largest_seed_works_in_every_generator_seeded_from_it():
    from and_mask.datasets import cifar, colored_mnist, synthetic
    from gen_mask.erm_irm.fit import trial_seed

    cli.seed_everything(MAX_SEED)
    torch.Generator().manual_seed(MAX_SEED)
    labels = torch.arange(10) % 2
    cifar.relabel(labels, 0.5, MAX_SEED)
    colored_mnist.relabel(labels, 0.5, 2, MAX_SEED)
    trial_seed(MAX_SEED, 24, 60000, 1)
    # The synthetic task seeds environment e with seed + e: the last of 4 environments may reach MAX_SEED ...
    synthetic.make_loaders(8, 8, 4, 1, 2, 4, MAX_SEED - 3)
    with pytest.raises(ValueError):  # ... but not beyond, which the flags' check refuses first
        synthetic.make_loaders(8, 8, 4, 1, 2, 4, MAX_SEED - 2)


AND_MASK = ["--method", "and_mask", "--agreement_threshold", "1", "--scale_grad_inverse_sparsity", "1"]
LABELS = ["--init_lr", "1e-3", "--weight_decay", "0", "--random_labels_fraction", "0"]
# Mistakes that argparse cannot see but that need no data: refused before any data or folder.
REFUSED_BEFORE_ANY_FOLDER = [
    ("and_mask.run_synthetic", AND_MASK + ["--n_train_envs", "4", "--n_agreement_envs", "4",
                                           "--seed", str(MAX_SEED - 2)]),
    ("and_mask.run_synthetic", AND_MASK[:3] + ["1.5"] + AND_MASK[4:]),
    ("and_mask.run_synthetic", AND_MASK + ["--resume"]),
    ("gen_mask.run_synthetic", ["--method", "mgda", "--cagrad_c", "0.5"]),
    ("gen_mask.run_synthetic", ["--method", "sand_mask", "--sand_k", "-1"]),
    ("and_mask.run_colored_mnist", AND_MASK + LABELS + ["--n_dims", "5", "--output_dir", "out"]),
    ("gen_mask.run_cifar", ["--method", "mean", *LABELS, "--train_subset", "8", "--output_dir", "out"]),
    ("gen_mask.run_erm_irm", ["--dataset", "sem_hb", "--methods", "irm", "--steps", "100", "--out", "out"]),
    ("gen_mask.run_erm_irm", ["--dataset", "sem_hb", "--methods", "erm,nonsense", "--out", "out"]),
    ("vizualization.toy_landscape", ["--method", "trimmed_mean", "--trim_fraction", "0.6", "--out", "out"]),
    ("vizualization.loss_landscape", ["--run", "nowhere", "--alpha_range", "1", "0", "--out", "out"]),
    ("vizualization.loss_landscape", ["--run", "nowhere", "--out", "out"]),
    ("vizualization.plot_runs", ["nowhere", "--out", "out"]),
]


@pytest.mark.parametrize("module,argv", REFUSED_BEFORE_ANY_FOLDER)
def test_a_refused_command_leaves_no_folder_behind(module, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((SystemExit, RunError)) as done:
        importlib.import_module(module).main(argv)
    if done.type is SystemExit:
        assert done.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"python -m {module}: error: ")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_learning_rates_are_positive(module, capsys):
    parser = parser_of(module)
    rates = [a for a in options(parser) if re.fullmatch(r"(\w+_)?lr", a.dest) and a.dest not in HPARAM_NAMES]
    for action in rates:
        for bad in ("0", "-1e-3"):
            parse_error(parser, required_argv(parser) + [f"{action.option_strings[0]}={bad}"], capsys)
    if module.split(".")[1].startswith("run_") or module == "vizualization.toy_landscape":
        assert rates, module


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_hyper_parameters_reject_non_finite_values(bad):
    threshold = next(h for h in COMBINERS["and_mask"].hparams if h.name == "agreement_threshold")
    assert threshold.check(bad) == f"--agreement_threshold must be a finite number, got {bad}"
    plugin = HParam("alpha", float, 0.5, "A plugin's weight, without bounds.")
    assert plugin.check(bad) == f"--alpha must be a finite number, got {bad}"
    assert plugin.check(1e300) is None and plugin.check(-3) is None
    assert "finite" in HParam("k", int, 1, "A plugin's count.", low=0).check(bad)
    weights = torch.ones(3, requires_grad=True)
    output = (torch.randn(4, 3) @ weights).unsqueeze(1)
    with pytest.raises(ValueError, match="finite"):  # the library entry point checks them the same way
        get_grads(2, 2, torch.nn.functional.mse_loss, [weights], output, torch.zeros(4, 1), method="sand_mask",
                  sand_k=bad)


def test_a_plugin_s_float_flag_refuses_non_finite_values_when_parsed(capsys):
    registry = CombinerRegistry()

    @registry.register("scaled", hparams=[HParam("alpha", float, 0.5, "A plugin's weight, without bounds.")])
    def scaled(grads, alpha=0.5):
        """Scaled mean: alpha · mean_e g_e."""
        return alpha * grads.mean(dim=0), {}

    parser = flags.entry_parser("plugin", "A parser with a plugin's flags.")
    method_flags = MethodFlags(registry)
    method_flags.add_flags(parser)
    for bad in NON_FINITE:
        assert "--alpha" in parse_error(parser, ["--method", "scaled", f"--alpha={bad}"], capsys)
    args = parser.parse_args(["--method", "scaled", "--alpha", "-2.5"])
    assert method_flags.resolve(args, parser)[1] == {"alpha": -2.5}
