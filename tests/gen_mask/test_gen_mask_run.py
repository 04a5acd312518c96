"""gen_mask entry points: get_grads / get_grads_from_model, the run_synthetic command line (flags
built from the registry, short end-to-end runs, clear errors) and gen_mask/README.md's own-combiner example."""
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from and_mask import summarize
from and_mask.models import MLP
from gen_mask import run_synthetic
from gen_mask.gen_mask_utils import COMBINERS, get_grads, get_grads_from_model

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--examples_per_env", "64", "--n_test", "100", "--n_envs", "4", "--batch_size", "16",
         "--n_hidden_units", "16", "--n_hidden_layers", "2", "--epochs", "2", "--quiet", "--use_cuda", "0"]
N_ENVS, BATCH = 4, 8


def tiny_problem(seed=0):
    torch.manual_seed(seed)
    model = MLP(5, 8, 2, 1)
    inputs = torch.randn(N_ENVS * BATCH, 5)
    target = (torch.rand(N_ENVS * BATCH) > 0.5).float()
    return model, inputs, target


def loop_reference(name, model, inputs, target, n_envs):
    """Gradients combined by `name` with the loop engine: from the forward pass's output, or, for a
    rule that needs Hessian-vector products (which an output cannot give), from the model."""
    params = list(model.parameters())
    if COMBINERS[name].needs_hvp:
        with pytest.raises(ValueError, match="use get_grads_from_model"):
            get_grads(inputs.shape[0] // n_envs, n_envs, F.binary_cross_entropy_with_logits, params, model(inputs),
                      target, method=name)
        torch.manual_seed(1)
        return get_grads_from_model(model, inputs, target, F.binary_cross_entropy_with_logits, n_envs, method=name,
                                    engine="loop")
    torch.manual_seed(1)  # pcgrad draws its projection order
    return get_grads(inputs.shape[0] // n_envs, n_envs, F.binary_cross_entropy_with_logits, params, model(inputs),
                     target, method=name, engine="loop")


@pytest.mark.parametrize("name", sorted(COMBINERS))
def test_get_grads_and_the_model_entry_point_agree(name):
    model, inputs, target = tiny_problem()
    params = list(model.parameters())
    loss, diagnostics = loop_reference(name, model, inputs, target, N_ENVS)
    from_output = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    torch.manual_seed(1)
    loss2, _ = get_grads_from_model(model, inputs, target, F.binary_cross_entropy_with_logits, N_ENVS, method=name)
    torch.testing.assert_close(loss, loss2)
    for a, p in zip(from_output, params):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    assert len(diagnostics) == len(params)


@pytest.mark.parametrize("name", sorted(COMBINERS))
def test_per_example_environments_through_the_outer_engine_agree_with_the_loop(name):
    """One example per environment: the outer engine's factored gradients, materialised or not."""
    model, inputs, target = tiny_problem()
    params = list(model.parameters())
    n_examples = N_ENVS * BATCH
    loop_reference(name, model, inputs, target, n_examples)
    reference = [p.grad.clone() for p in params]
    torch.manual_seed(1)
    get_grads_from_model(model, inputs, target, F.binary_cross_entropy_with_logits, n_examples, method=name,
                         engine="outer")
    for a, p in zip(reference, params):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)


def test_get_grads_mean_is_the_gradient_of_the_mean_loss():
    model, inputs, target = tiny_problem()
    params = list(model.parameters())
    get_grads(BATCH, N_ENVS, F.binary_cross_entropy_with_logits, params, model(inputs), target, method="mean")
    combined = [p.grad.clone() for p in params]
    model.zero_grad()
    F.binary_cross_entropy_with_logits(model(inputs).squeeze(-1), target).backward()  # equal env sizes: same mean
    for a, p in zip(combined, params):
        torch.testing.assert_close(a, p.grad)


def test_get_grads_uses_hyper_parameters_and_rejects_unknown_names():
    model, inputs, target = tiny_problem()
    params = list(model.parameters())
    args = (BATCH, N_ENVS, F.binary_cross_entropy_with_logits, params, model(inputs), target)
    _, diagnostics = get_grads(*args, method="and_mask", agreement_threshold=0.0)
    assert all(float(d["mask"].min()) == 1 for d in diagnostics)
    with pytest.raises(KeyError, match="valid names: .*align_weights"):
        get_grads(*args, method="no_such_rule")
    with pytest.raises(ValueError, match="not hyper-parameter.*weight_bound"):
        get_grads(*args, method="align_weights", bound=3.0)
    with pytest.raises(ValueError, match="trim_fraction must be <="):
        get_grads(*args, method="trimmed_mean", trim_fraction=0.7)
    with pytest.raises(ValueError, match="expected n_envs \\* batch_size"):
        get_grads(BATCH + 1, *args[1:], method="mean")


def test_help_lists_every_combiner_and_every_hyper_parameter(capsys):
    with pytest.raises(SystemExit) as done:
        run_synthetic.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, combiner in COMBINERS.items():
        assert f"{name}:" in text
        for hp in combiner.hparams:
            assert f"--{hp.name}" in text
    assert "--n_envs" in text and "--n_train_envs" not in text and "--n_agreement_envs" not in text


@pytest.mark.parametrize("method,flags", [("align_weights", ["--weight_bound", "1.5"]), ("mgda", [])])
def test_short_run_writes_the_same_outputs_as_and_mask_runs(tmp_path, method, flags, capsys):
    final = run_synthetic.main(SMALL + ["--method", method, *flags, "--output_dir", str(tmp_path)])
    assert final["phase"] == "final" and 0 <= final["test_acc"] <= 1
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "weights_init.pt", "weights_final.pt"):
        assert (tmp_path / name).exists(), name
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2, 2] and records[-1]["phase"] == "final"
    for r in records[:2]:
        assert {"test_loss", "test_acc", "train_loss", "train_acc", "lr", "mask_density"} <= set(r)
    config = json.load(open(tmp_path / "config.json"))
    assert config["package"] == "gen_mask" and config["flags"]["method"] == method
    summarize.main([str(tmp_path)])  # the results-table tool reads it back
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith(f"| {method} |") and f"{100 * final['test_acc']:.1f} ± 0.0" in row


@pytest.mark.parametrize("argv,message", [
    (["--method", "mgda", "--cagrad_c", "0.5"], "not a hyper-parameter of --method mgda"),
    (["--method", "sand_mask", "--agreement_threshold", "1.5"], "agreement_threshold must be <= 1"),
    (["--method", "no_such_rule"], "invalid choice"),
    (["--method", "mean", "--n_train_envs", "4"], "unrecognized arguments"),
])
def test_bad_flags_fail_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as done:
        run_synthetic.main(SMALL + argv)
    assert done.value.code == 2
    assert message in capsys.readouterr().err


def readme_example() -> tuple[str, list]:
    """gen_mask/README.md's own-combiner example: (the code of my_rule.py, the flags of its printed command)."""
    readme = (ROOT / "gen_mask" / "README.md").read_text()
    section = readme.split("<!-- section: gen-mask -->")[1].split("<!-- end section: gen-mask -->")[0]
    blocks = re.findall(r"```python\n(# my_rule\.py.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "gen_mask/README.md's gen-mask section must hold one ```python block starting '# my_rule.py'"
    command = re.search(r"python3? my_rule\.py ([^\n`]*)", section)
    assert command, "gen_mask/README.md must show the command that runs my_rule.py"
    return blocks[0], command.group(1).split()


def test_readme_example_of_an_own_combiner_works_as_printed(tmp_path):
    code, command = readme_example()
    assert len(code.strip().splitlines()) <= 16
    (tmp_path / "my_rule.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "my_rule.py", *command, *SMALL, "--epochs", "1",
                          "--output_dir", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    # the generic registry checks apply to it as well
    spec = importlib.util.spec_from_file_location("my_rule_from_readme", tmp_path / "my_rule.py")
    module = importlib.util.module_from_spec(spec)
    before = set(COMBINERS)
    try:
        spec.loader.exec_module(module)
        (name,) = set(COMBINERS) - before
        generic = importlib.import_module("tests.gen_mask.test_gen_mask_combiners")
        for n_envs in (1, 4):
            generic.test_identical_environments_give_back_their_gradient(name, n_envs)
            generic.test_output_has_the_parameter_shapes_and_is_finite(name, n_envs, torch.float32, "cpu")
    finally:
        for name in set(COMBINERS) - before:
            del COMBINERS[name]
