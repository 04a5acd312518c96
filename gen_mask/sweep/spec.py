"""What a sweep is: tasks read from a TOML file (or command-line flags), expanded into runs.

A task names an entry module and its flags: fixed `flags`, a `grid` (every combination), a
seeded `random` search (n draws, crossed with the grid) and `seeds` (`--seed` of each run). A
file holds one task at its top level (`module = ...`) or several `[[task]]` tables; in the
latter, top-level `module`, `seeds`, `flags`, `grid` and `random` are defaults that each task
extends (a task's entries replace top-level ones of the same name).

    module = "gen_mask.run_synthetic"
    seeds = [0, 1, 2]                # or a count: seeds = 3 means 0, 1, 2
    [flags]                          # the same in every run; true is a bare --flag, false leaves it out
    epochs = 20
    [grid]                           # every combination
    method = ["mean", "and_mask", "geom_mean"]
    [random]                         # n draws, crossed with the grid
    n = 4
    seed = 0                         # optional: another seed gives other draws
    lr = { log_uniform = [1e-4, 1e-2] }

How `collect` reports a task (keys of the task or, as defaults, of the top level; every one is
optional and none changes a run):

    metric = "test_acc"              # the headline number (default: the module's, see gen_mask.sweep.collect)
    higher_is_better = true
    validation = "val_acc"           # what training-domain selection compares; "" for none
    search = ["lr"]                  # hyper-parameters selected per method (default: the [random] flags)
    [not_run]                        # methods shown as n/a with the reason, never run
    dann = "every example is its own environment here"

Distributions: `log_uniform = [low, high]` and `uniform = [low, high]` (floats, rounded to six
significant digits so commands stay readable), `int_uniform = [low, high]` (integers, both ends
included), `choice = [a, b, ...]`.

Draw i of flag f comes from a generator seeded by (random seed, f, i) alone, so adding a flag to
the search, or raising n, leaves the other draws unchanged (as in DomainBed). Expansion order is
task, seed, grid point (the grid's flags in file order, the last varying fastest), draw.

A run's id is a short hash of its command: the module and the sorted `--flag value` pairs, without
the flags that do not change the numbers (`NOT_HASHED` and any flag naming a path). Runs with the
same id are one run (a choice drawn twice); two tasks that both contain one run are refused.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from and_mask.core.errors import RunError

DISTRIBUTIONS = ("log_uniform", "uniform", "int_uniform", "choice")
REPORT_KEYS = {"metric": str, "higher_is_better": bool, "validation": str, "search": list, "not_run": dict}
SHARED_KEYS = {"module", "seeds", "flags", "grid", "random", *REPORT_KEYS}
TASK_KEYS = {"name", "seeds_for", *SHARED_KEYS}
# Flags set by the launcher or that do not change a run's numbers; with the path flags, not hashed.
NOT_HASHED = {"output_dir", "out", "resume", "overwrite", "quiet"}
PATH_SUFFIXES = ("_dir", "_path", "_root")
RESERVED = {"output_dir", "out", "resume", "overwrite", "seed"}
FLAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*$")
ID_LENGTH = 12


@dataclass
class Task:
    """One entry module and the flags of its runs, as read from the sweep file."""

    name: str
    module: str
    seeds: list
    flags: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    random: dict = field(default_factory=dict)  # {"n": draws, "seed": s, flag: {kind: args}}
    report: dict = field(default_factory=dict)  # the REPORT_KEYS given: how collect reports the task
    seeds_for: dict = field(default_factory=dict)  # {grid flag: {value: seeds}}: fewer seeds for those runs

    def to_json(self) -> dict:
        return {"name": self.name, "module": self.module, "seeds": self.seeds, "flags": self.flags,
                "grid": self.grid, "random": self.random, "report": self.report, "seeds_for": self.seeds_for}

    def runs_seed(self, grid: dict, seed: int) -> bool:
        """Whether the grid point `grid` runs with `seed`: every seed, unless [seeds_for] lists fewer."""
        return all(seed in self.seeds_for[flag].get(value, self.seeds) for flag, value in grid.items()
                   if flag in self.seeds_for)


@dataclass
class PlannedRun:
    """One command of a sweep: `python -m module` with `flags` (the output flag added at launch)."""

    task: str
    module: str
    flags: dict  # every flag of the command, --seed included, in command order
    grid: dict  # the grid's values of this run
    drawn: dict  # the random search's values of this run
    draw: int | None  # index of the random draw, None without a random search
    seed: int

    @property
    def args(self) -> list[str]:
        return flag_args(self.flags)

    @property
    def id(self) -> str:
        return run_id(self.module, self.flags)

    def to_json(self) -> dict:
        return {"id": self.id, "task": self.task, "module": self.module, "seed": self.seed, "flags": self.flags,
                "grid": self.grid, "random": self.drawn, "draw": self.draw, "args": self.args}

    @classmethod
    def from_json(cls, record: dict) -> "PlannedRun":
        return cls(task=record["task"], module=record["module"], flags=record["flags"], grid=record["grid"],
                   drawn=record["random"], draw=record["draw"], seed=record["seed"])


def flag_args(flags: dict) -> list[str]:
    """`--name value` for each flag; true is a bare `--name`, false leaves the flag out."""
    args = []
    for name, value in flags.items():
        if value is True:
            args.append(f"--{name}")
        elif value is not False:
            args += [f"--{name}", str(value)]
    return args


def is_hashed(name: str) -> bool:
    return name not in NOT_HASHED and not name.endswith(PATH_SUFFIXES)


def run_id(module: str, flags: dict) -> str:
    """First ID_LENGTH hex digits of sha256(json([module, sorted (flag, value text) pairs]))."""
    pairs = sorted((name, text) for name, text in _pairs(flags) if is_hashed(name))
    digest = hashlib.sha256(json.dumps([module, pairs]).encode()).hexdigest()
    return digest[:ID_LENGTH]


def _pairs(flags: dict):
    for name, value in flags.items():
        if value is not False:
            yield name, "" if value is True else str(value)


def _fail(where: str, message: str):
    raise RunError(f"{where}: {message}")


def _check_scalar(where, name, value):
    if not isinstance(value, (bool, int, float, str)):
        _fail(where, f"{name} must be a number, a string or a boolean, got {value!r}"
                     + (" (put several values in [grid])" if isinstance(value, list) else ""))
    if isinstance(value, float) and not math.isfinite(value):
        _fail(where, f"{name} must be finite, got {value}")


def _check_flag_name(where, name):
    if not FLAG_NAME.match(name):
        _fail(where, f"{name!r} is not a flag name")
    if name in RESERVED:
        hint = "list seeds in `seeds`" if name == "seed" else "the sweep sets it for each run"
        _fail(where, f"{name} cannot be set in a sweep ({hint})")


def _seeds(where, value) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            _fail(where, f"seeds = {value}: a count of seeds must be positive")
        return list(range(value))
    if (not isinstance(value, list) or not value
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)):
        _fail(where, f"seeds must be a count or a non-empty list of non-negative integers, got {value!r}")
    if len(set(value)) != len(value):
        _fail(where, f"seeds repeat a value: {value}")
    return list(value)


def _distribution(where, name, spec):
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        _fail(where, f"random.{name} must be one of {{ {' | '.join(f'{d} = [...]' for d in DISTRIBUTIONS)} }}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        _fail(where, f"random.{name}.{kind} needs a list")
    if kind == "choice":
        for value in args:
            _check_scalar(where, f"random.{name}", value)
        return
    numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)
    if len(args) != 2 or not numeric or not args[0] < args[1]:
        _fail(where, f"random.{name}.{kind} needs [low, high] with low < high, got {args}")
    if kind == "log_uniform" and args[0] <= 0:
        _fail(where, f"random.{name}.log_uniform needs a positive low end, got {args[0]}")
    if kind == "int_uniform" and not all(isinstance(a, int) for a in args):
        _fail(where, f"random.{name}.int_uniform needs integer ends, got {args}")


def _task(where: str, table: dict, defaults: dict) -> Task:
    unknown = set(table) - TASK_KEYS
    if unknown:
        _fail(where, f"unknown key(s) {', '.join(sorted(unknown))}; a task has {', '.join(sorted(TASK_KEYS))}")
    module = table.get("module", defaults.get("module"))
    if not isinstance(module, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", module):
        _fail(where, f"`module` must name a Python module to run with -m, got {module!r}")
    name = table.get("name", module.rsplit(".", 1)[-1].removeprefix("run_"))
    if not isinstance(name, str) or not name.strip() or "\n" in name:
        _fail(where, f"`name` must be a one-line text, got {name!r}")
    where = f"{where} ({name})"
    if "seeds" not in table and "seeds" not in defaults:
        _fail(where, "`seeds` is missing (a count, or a list of seeds)")
    seeds = _seeds(where, table.get("seeds", defaults.get("seeds")))
    sections = {}
    for key in ("flags", "grid", "random"):
        for source in (defaults, table):
            if not isinstance(source.get(key, {}), dict):
                _fail(where, f"`{key}` must be a table")
        sections[key] = {**defaults.get(key, {}), **table.get(key, {})}
    flags, grid, search = sections["flags"], sections["grid"], dict(sections["random"])
    draws, random_seed = search.pop("n", None), search.pop("seed", 0)
    for name_, value in flags.items():
        _check_flag_name(where, name_)
        _check_scalar(where, f"flags.{name_}", value)
    for name_, values in grid.items():
        _check_flag_name(where, name_)
        if not isinstance(values, list) or not values:
            _fail(where, f"grid.{name_} must be a non-empty list")
        for value in values:
            _check_scalar(where, f"grid.{name_}", value)
    for name_, spec in search.items():
        _check_flag_name(where, name_)
        _distribution(where, name_, spec)
    if search and (not isinstance(draws, int) or isinstance(draws, bool) or draws <= 0):
        _fail(where, f"random.n must be a positive number of draws, got {draws!r}")
    if draws is not None and not search:
        _fail(where, "random.n is set but no flag is drawn")
    if not isinstance(random_seed, int) or isinstance(random_seed, bool):
        _fail(where, f"random.seed must be an integer, got {random_seed!r}")
    for a, b in (("flags", "grid"), ("flags", "random"), ("grid", "random")):
        both = set(sections[a]) & (set(search) if b == "random" else set(sections[b]))
        if both:
            _fail(where, f"{', '.join(sorted(both))} is both in [{a}] and [{b}]")
    random_table = {"n": draws, "seed": random_seed, **search} if search else {}
    report = _report(where, {key: table.get(key, defaults.get(key)) for key in REPORT_KEYS}, grid, search)
    seeds_for = _seeds_for(where, table.get("seeds_for", {}), grid, seeds)
    return Task(name=name, module=module, seeds=seeds, flags=flags, grid=grid, random=random_table, report=report,
                seeds_for=seeds_for)


def _seeds_for(where, table, grid: dict, seeds: list) -> dict:
    """[seeds_for.FLAG] VALUE = seeds: the runs whose grid flag FLAG is VALUE take only these seeds
    (of the task's), e.g. a costly method run once; checked against the grid and the seeds."""
    if not isinstance(table, dict):
        _fail(where, "`seeds_for` must be a table of [seeds_for.FLAG] tables")
    checked = {}
    for flag, values in table.items():
        if flag not in grid or not isinstance(values, dict):
            _fail(where, f"seeds_for.{flag} must be a table of values of a flag that [grid] varies")
        checked[flag] = {}
        for key, raw_seeds in values.items():  # TOML keys are strings: match them to the grid's values
            value = next((v for v in grid[flag] if str(v) == key), None)
            if value is None:
                _fail(where, f"seeds_for.{flag}.{key}: {key} is not one of grid.{flag}")
            value_seeds = _seeds(f"{where}: seeds_for.{flag}.{key}", raw_seeds)
            if not set(value_seeds) <= set(seeds):
                _fail(where, f"seeds_for.{flag}.{key} = {value_seeds} is not a subset of the task's seeds {seeds}")
            checked[flag][value] = value_seeds
    return checked


def _report(where: str, given: dict, grid: dict, search: dict) -> dict:
    """The report keys given (None: absent), checked: types, searched flags that the task varies."""
    report = {key: value for key, value in given.items() if value is not None}
    for key, value in report.items():
        if not isinstance(value, REPORT_KEYS[key]):
            _fail(where, f"`{key}` must be a {REPORT_KEYS[key].__name__}, got {value!r}")
    if not report.get("metric", "x").strip():
        _fail(where, "`metric` must name a number of the runs' results, e.g. test_acc")
    unknown = [flag for flag in report.get("search", []) if flag not in grid and flag not in search]
    if unknown:
        _fail(where, f"search lists {', '.join(map(str, unknown))}, which neither [grid] nor [random] varies")
    if not all(isinstance(v, str) and v.strip() for v in report.get("not_run", {}).values()):
        _fail(where, "each entry of [not_run] must be a method's name = the reason it is not run")
    return report


def parse_spec(raw: dict, where: str = "sweep") -> list[Task]:
    """The tasks of a sweep given as a dict (the TOML file's, or built from flags); RunError if invalid."""
    if "task" in raw:
        unknown = set(raw) - SHARED_KEYS - {"task"}
        if unknown:
            _fail(where, f"with [[task]] tables the top level holds only {', '.join(sorted(SHARED_KEYS))}, "
                         f"not {', '.join(sorted(unknown))}")
        if not isinstance(raw["task"], list) or not raw["task"]:
            _fail(where, "`task` must be a list of tables ([[task]])")
        tasks = [_task(f"{where}: task {i + 1}", table, raw) for i, table in enumerate(raw["task"])]
    else:
        tasks = [_task(where, raw, {})]
    names = [t.name for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        _fail(where, f"task names repeat: {', '.join(repeated)} (give each [[task]] its own `name`)")
    return tasks


def read_spec(path) -> dict:
    """The sweep file at `path` as a dict, not yet checked (`parse_spec` checks it)."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except OSError as error:
        raise RunError(f"cannot read the sweep file {path}: {error.strerror}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise RunError(f"{path} is not valid TOML: {error}")


def load_spec(path) -> list[Task]:
    """The tasks of the sweep file at `path`."""
    return parse_spec(read_spec(path), str(path))


def draw(spec: dict, random_seed: int, name: str, index: int):
    """Draw `index` of flag `name`: a function of (random_seed, name, index) only."""
    seed = int.from_bytes(hashlib.sha256(f"{random_seed}/{name}/{index}".encode()).digest()[:8], "big")
    u = random.Random(seed).random()
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return args[min(int(u * len(args)), len(args) - 1)]
    if kind == "int_uniform":
        low, high = args
        return low + min(int(u * (high - low + 1)), high - low)
    low, high = args
    value = math.exp(math.log(low) + u * (math.log(high) - math.log(low))) if kind == "log_uniform" \
        else low + u * (high - low)
    return float(f"{value:.6g}")


def expand_task(task: Task) -> list[PlannedRun]:
    search = {k: v for k, v in task.random.items() if k not in ("n", "seed")}
    draws = range(task.random["n"]) if search else [None]
    points = list(itertools.product(*task.grid.values()))
    runs = []
    for seed in task.seeds:
        for point in points:
            grid = dict(zip(task.grid, point))
            if not task.runs_seed(grid, seed):
                continue
            for index in draws:
                drawn = {name: draw(spec, task.random["seed"], name, index) for name, spec in search.items()}
                flags = {**task.flags, **grid, **drawn, "seed": seed}
                runs.append(PlannedRun(task=task.name, module=task.module, flags=flags, grid=grid, drawn=drawn,
                                draw=index, seed=seed))
    return runs


def expand(tasks: list[Task]) -> list[PlannedRun]:
    """Every run of the sweep, in order, one per distinct command."""
    runs, owner = [], {}
    for task in tasks:
        for run in expand_task(task):
            if run.id in owner:
                if owner[run.id] != task.name:
                    raise RunError(f"tasks {owner[run.id]} and {task.name} both hold the run "
                                   f"`{run.module} {' '.join(run.args)}`; a run belongs to one task")
                continue
            owner[run.id] = task.name
            runs.append(run)
    return runs
