"""Every shell command in every README is one the code accepts (parsed, never run).

`python -m MODULE ...` of a project module: MODULE is in `tests/support/entry_points.py` and its
`build_parser()` accepts the arguments. `pytest`, `pip`, scripts run by path, `make` targets
(and the `python -m` commands their recipes run), `torchrun` and `sbatch` are checked as far as
possible without running them: files exist, targets exist. Other programs are refused unless
listed as harmless, so that a new kind of command gets a check before it gets into a README.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.entry_points import ENTRY_POINTS, parser_of
from tests.support.readme_shell import ROOT, Command, fenced_blocks, readme_commands, readmes, script_commands

PROJECT_PACKAGES = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} | {"tests"}
PYTHON = re.compile(r"^(.*/)?python(3(\.\d+)?)?$")
WRAPPERS = {"env", "nohup", "time", "sudo", "command"}
HARMLESS = {"cd", "ls", "cat", "echo", "mkdir", "rm", "cp", "mv", "source", ".", "git", "head", "tail",
            "watch", "nvidia-smi", "squeue", "scancel", "sacct", "sinfo", "tar", "unzip", "du", "df",
            "diff", "grep", "find", "wc", "sort", "true", "false", "test", "[", "set", "which", "tee",
            "seq", "apt", "apt-get", "conda", "deactivate", "open", "xdg-open"}
PYTEST_VALUE_OPTIONS = {"-k", "-m", "-p", "-c", "-o", "-W", "--maxfail", "--durations", "--junitxml",
                        "--basetemp", "--rootdir", "--deselect", "--ignore", "--timeout"}
TORCHRUN_SWITCHES = {"--standalone", "--no-python", "--no_python", "--run-path", "--run_path"}


def parse_failure(module: str, args: list[str]) -> str | None:
    """argparse's message when the entry point refuses the arguments, else None."""
    out = io.StringIO()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(io.StringIO()):
        try:
            cached_parser(module).parse_args(args)
        except SystemExit as exit:
            if exit.code not in (0, None):  # 0: --help
                return out.getvalue().strip().splitlines()[-1]
    return None


@functools.cache
def cached_parser(module: str):
    return parser_of(module)


def missing_paths(paths, cwd: Path) -> list[str]:
    return [p for p in paths if not (cwd / p.split("::")[0]).exists()]


def check_pytest(args: list[str], cwd: Path) -> list[str]:
    paths, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in PYTEST_VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            paths.append(arg)
    return [f"pytest path not found: {p}" for p in missing_paths(paths, cwd)]


def check_pip(args: list[str], cwd: Path) -> list[str]:
    files = [b for a, b in zip(args, args[1:]) if a in ("-r", "-c", "--requirement", "--constraint", "-e")]
    return [f"pip file not found: {p}" for p in missing_paths(files, cwd)]


def check_module(module: str, args: list[str], cwd: Path) -> list[str]:
    if module.split(".")[0] in PROJECT_PACKAGES:
        if module not in ENTRY_POINTS:
            return [f"{module} is not an entry point of tests/support/entry_points.py"]
        failure = parse_failure(module, args)
        return [f"{module} refuses the arguments: {failure}"] if failure else []
    if module == "pytest":
        return check_pytest(args, cwd)
    if module == "pip":
        return check_pip(args, cwd)
    if importlib.util.find_spec(module) is None:
        return [f"no module named {module}"]
    return []


def check_python(args: list[str], cwd: Path) -> list[str]:
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] not in ("-m", "-c"):
        i += 2 if args[i] in ("-X", "-W") else 1
    if i == len(args) or args[i] == "-c":
        return []
    if args[i] == "-m":
        return check_module(args[i + 1], args[i + 2:], cwd) if i + 1 < len(args) else ["python -m without a module"]
    return [f"script not found: {args[i]}"] if missing_paths([args[i]], cwd) else []


def makefile_targets() -> set[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-/ ]+):(?!=)", line)
        if match:
            targets.update(match.group(1).split())
    return targets


def check_make(args: list[str]) -> list[str]:
    variables = [a for a in args if "=" in a and not a.startswith("-")]
    targets = [a for a in args if "=" not in a and not a.startswith("-")] or ["install"]
    errors = [f"no make target {t}" for t in targets if t not in makefile_targets()]
    if errors or shutil.which("make") is None:
        return errors
    # The recipe as make would run it (dry run), its python commands checked in turn; without the
    # flags of a make that runs this test (make test), which a sub-make would inherit.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    recipe = subprocess.run(["make", "-n", "-s", "--no-print-directory", *targets, *variables, "PYTHON=python"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    if recipe.returncode != 0:
        return [f"make -n {' '.join(args)} failed: {recipe.stderr.strip()}"]
    return [error for command in script_commands(recipe.stdout)
            if PYTHON.match(command.argv[0]) for error in check_python(list(command.argv[1:]), ROOT)]


def check_torchrun(args: list[str], cwd: Path) -> list[str]:
    i, module = 0, False
    while i < len(args) and args[i].startswith("-"):
        if args[i] in ("-m", "--module"):
            module = True
        elif args[i] not in TORCHRUN_SWITCHES and "=" not in args[i]:
            i += 1  # the option's value
        i += 1
    if i == len(args):
        return ["torchrun without a script or module"]
    if module:
        return check_module(args[i], args[i + 1:], cwd)
    return check_python(args[i:], cwd)


def check_sbatch(args: list[str], cwd: Path) -> list[str]:
    if any(a.startswith("--wrap") for a in args):
        return []
    scripts = [a for a in args if not a.startswith("-") and Path(a).suffix in (".sh", ".sbatch", ".slurm")]
    if not scripts:
        return ["sbatch without a batch script"]
    return [f"batch script not found: {p}" for p in missing_paths(scripts[:1], cwd)]


def check(argv: tuple[str, ...], cwd: Path = ROOT) -> list[str]:
    """What is wrong with one README command (empty: nothing)."""
    args = list(argv)
    while args and args[0] in WRAPPERS:
        args = [a for a in args[1:] if not re.match(r"^[A-Za-z_]\w*=", a)] if args[0] == "env" else args[1:]
    if not args:
        return []
    program, rest = args[0], args[1:]
    if PYTHON.match(program):
        return check_python(rest, cwd)
    if program == "pytest":
        return check_pytest(rest, cwd)
    if program in ("pip", "pip3"):
        return check_pip(rest, cwd)
    if program == "make":
        return check_make(rest)
    if program == "torchrun":
        return check_torchrun(rest, cwd)
    if program == "sbatch":
        return check_sbatch(rest, cwd)
    if program == "srun":  # srun [options] PROGRAM ...: check from the program on
        starts = [i for i, a in enumerate(rest) if PYTHON.match(a) or a in ("bash", "sh", "torchrun")]
        return check(tuple(rest[starts[0]:]), cwd) if starts else ["srun without a known program"]
    if program in ("bash", "sh") or "/" in program:
        script = rest[0] if program in ("bash", "sh") and rest else program
        return [f"script not found: {script}"] if missing_paths([script], cwd) else []
    if program in HARMLESS:
        return []
    return [f"unknown program {program!r}: add a check for it to tests/test_readme_commands.py"]


COMMANDS = readme_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.where()} {' '.join(c.argv)[:70]}")
def test_readme_command(command: Command):
    assert check(command.argv) == [], f"{command.where()}: {' '.join(command.argv)}"


def test_every_readme_is_read():
    found = {p.relative_to(ROOT).as_posix() for p in readmes()}
    assert {"README.md", "and_mask/README.md", "gen_mask/README.md", "vizualization/README.md"} <= found
    assert sum(c.argv[:2] == ("python", "-m") for c in COMMANDS) >= 20


@pytest.mark.parametrize("path", readmes(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_readme_python_blocks_compile(path: Path):
    for language, line, body in fenced_blocks(path.read_text()):
        if language in ("python", "py"):
            compile(body, f"{path.relative_to(ROOT)}:{line}", "exec")


def test_shell_reading():
    script = """COMMON="--epochs 2
        --use_cuda 0"
for seed in 0 1; do
  OMP_NUM_THREADS=1 python3 -m and_mask.run_synthetic $COMMON --seed $seed \\
      --output_dir runs/s${seed} 2>&1 | tee log  # comment
done
make install && python -m pytest -q tests/and_mask/test_optim.py"""
    argv = [c.argv for c in script_commands(script)]
    synthetic = ("python3", "-m", "and_mask.run_synthetic", "--epochs", "2", "--use_cuda", "0", "--seed")
    assert argv == [synthetic + ("0", "--output_dir", "runs/s0"), ("tee", "log"),
                    synthetic + ("1", "--output_dir", "runs/s1"), ("tee", "log"),
                    ("make", "install"), ("python", "-m", "pytest", "-q", "tests/and_mask/test_optim.py")]
    assert [c.line for c in script_commands(script)] == [4, 4, 4, 4, 7, 7]


@pytest.mark.parametrize("command, error", [
    ("python -m gen_mask.run_synthetic --method mean --no_such_flag 1", "unrecognized arguments"),
    ("python -m and_mask.run_synthetic --method and_mask --agreement_threshold 1 "
     "--scale_grad_inverse_sparsity 1 --epochs $N", "invalid positive_int value"),
    ("python -m and_mask.run_synthetic --agreement_threshold 1 --scale_grad_inverse_sparsity 1", "required"),
    ("python -m and_mask.no_such_module", "not an entry point"),
    ("python -m no_such_package_anywhere", "no module named"),
    ("python tests/no_such_script.py", "script not found"),
    ("python -m pytest tests/test_no_such_file.py", "pytest path not found"),
    ("make no_such_target", "no make target"),
    ("make synthetic ARGS='--no_such_flag 1'", "unrecognized arguments"),
    ("bash no/such/script.sh", "script not found"),
    ("sbatch --time 10 no_such_job.sh", "batch script not found"),
    ("torchrun --nproc_per_node 2 -m gen_mask.run_synthetic --method no_such_method", "invalid choice"),
    ("frobnicate --all", "unknown program"),
])
def test_bad_commands_are_caught(command, error):
    (parsed,) = script_commands(command)
    problems = check(parsed.argv)
    assert problems and error in problems[0], problems


@pytest.mark.parametrize("command", [
    "python -m gen_mask.run_synthetic --help",
    "make synthetic ARGS='--epochs 2'",
    "make install",
    "GEN_MASK_PLUGINS=my_rule python -m pytest tests/gen_mask/test_gen_mask_combiners.py",
    "torchrun --standalone --nproc_per_node 2 -m gen_mask.run_synthetic --method mean",
    "bash and_mask/experiments/multinode.sbatch",
    "srun --ntasks 1 python -m gen_mask.run_synthetic --method mean",
])
def test_good_commands_pass(command):
    (parsed,) = script_commands(command)
    assert check(parsed.argv) == []
