"""Sweeps: many runs of any entry module, launched here (a process pool) or on SLURM (submitit).

    python -m gen_mask.sweep run SWEEP.toml --out DIR --launcher local|slurm|dry
    python -m gen_mask.sweep collect DIR

`spec` reads and expands the sweep file, `jobs` turns runs into checked commands, `execute` runs
one command, `local` and `slurm` are the launchers (`slurm_job` is what runs on the cluster),
`collect` reads a sweep folder into rows and `leaderboard_files` writes them as leaderboard.md,
.csv and .png, `cli` the subcommands and `slurm_cluster` a one-node SLURM cluster for trying the
SLURM path on one machine. The sweep folder itself (its layout, and how a run's status is read)
is `and_mask.core.sweepfolder`, which the paper analyses read too.
"""
