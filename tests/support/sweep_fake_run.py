"""A run module for the sweep tests that starts in milliseconds (no torch) and keeps the run-folder
contract: run.lock held while it runs, config.json, metrics.jsonl one line per epoch, an atomic
end-of-epoch checkpoint, --resume from it, status.json written last.

    python -m tests.sweep_fake_run --output_dir D [--epochs N] [--sleep S] [--fail_at E] [--resume] ...
"""
import argparse
import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m tests.sweep_fake_run")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per epoch")
    parser.add_argument("--fail_at", type=int, default=None, help="fail at this epoch")
    parser.add_argument("--fail_marker", default=None, help="fail at epoch 2 while this file exists")
    parser.add_argument("--die_marker", default=None, help="SIGKILL itself at epoch 2 while this file exists")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--method", default="mean")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    return parser


def _write_atomic(path: Path, text: str):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _status(out: Path, status: str, code: int, error):
    _write_atomic(out / "status.json", json.dumps({"status": status, "exit_code": code, "error": error,
                                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "ranks.jsonl", "a") as f:  # the torch.distributed variables a launcher exported
        f.write(json.dumps({k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}) + "\n")
    if os.environ.get("RANK", "0") != "0":  # as in a distributed run, rank 0 alone writes the folder
        return
    lock = open(out / "run.lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"error: {out} is in use by another process")
    if not args.resume and (out / "config.json").exists():
        sys.exit(f"error: {out} already holds a run; use --resume")
    (out / "config.json").write_text(json.dumps({"flags": vars(args), "threads": os.environ.get("OMP_NUM_THREADS")}))
    start = 1
    if args.resume and (out / "checkpoint.json").exists():
        start = json.loads((out / "checkpoint.json").read_text())["epoch"] + 1
    metrics = out / "metrics.jsonl"
    kept = [line for line in (metrics.read_text().splitlines() if metrics.exists() else [])
            if json.loads(line)["epoch"] < start]
    _write_atomic(metrics, "".join(line + "\n" for line in kept))
    try:
        for epoch in range(start, args.epochs + 1):
            time.sleep(args.sleep)
            if epoch == args.fail_at or (epoch == 2 and args.fail_marker and os.path.exists(args.fail_marker)):
                raise RuntimeError(f"boom at epoch {epoch}")
            if epoch == 2 and args.die_marker and os.path.exists(args.die_marker):
                os.kill(os.getpid(), signal.SIGKILL)
            with open(metrics, "a") as f:
                f.write(json.dumps({"epoch": epoch, "value": args.seed + args.lr * epoch, "pid": os.getpid()}) + "\n")
            _write_atomic(out / "checkpoint.json", json.dumps({"epoch": epoch}))
    except KeyboardInterrupt:
        _status(out, "interrupted", 1, None)
        sys.exit(f"interrupted; resume from {out}")
    except RuntimeError as error:
        _status(out, "failed", 1, str(error))
        sys.exit(f"error: {error}")
    print(f"final: {args.epochs} epochs")
    _status(out, "finished", 0, None)


if __name__ == "__main__":
    main()
