"""ERM, IRMv1 and the gradient combiners against training size, on the benchmark of "Empirical or
Invariant Risk Minimization? A Sample Complexity Perspective" (Ahuja et al., ICLR 2021).

    python -m gen_mask.run_erm_irm --dataset sem_hb --methods erm,irm,and_mask --out runs/sem_hb

Writes OUT/results.jsonl (one line per finished method, size and trial; a rerun resumes),
OUT/table.md and OUT/error_vs_n.png; OUT/run.lock refuses a second process at once and
OUT/status.json records how the last one ended, as in a training run's folder. See
gen_mask/erm_irm/ for the data and the methods.
"""
from __future__ import annotations

import sys

from and_mask.core.distributed import launched_ranks
from and_mask.core.errors import RunError
from and_mask.core.runfolder import FolderLock, holds_run, outcome, terminate_as_interrupt
from gen_mask.erm_irm.options import build_parser, parse
from gen_mask.erm_irm.report import write_report
from gen_mask.erm_irm.sweep import check_out, run_sweep

__all__ = ["build_parser", "main", "parse"]


def main(argv=None) -> str:
    args, sweep = parse(argv)
    if launched_ranks() > 1:  # its fits are vectorised over trials in one process; K copies would share --out
        sys.exit("error: gen_mask.run_erm_irm runs in one process; start it without torchrun")
    title = sweep.dataset + ("" if sweep.is_sem else f" ({sweep.image_data})")
    try:
        if holds_run(args.out):
            raise RunError(f"{args.out} holds a training run; choose another --out")
        with terminate_as_interrupt(), FolderLock(args.out, "--out") as folder:
            check_out(sweep, args.out)  # a refused folder keeps its status
            folder.start()
            records = run_sweep(sweep, args.out, quiet=args.quiet)
            table = write_report(args.out, records, sweep.is_sem, title)
    except RunError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt as error:
        ended = outcome(error)
        print(f"{ended['error']}; finished fits are kept in {args.out}/results.jsonl, rerun the command to resume",
              file=sys.stderr)
        sys.exit(ended["exit_code"])
    print(table)
    return table


if __name__ == "__main__":
    main()
