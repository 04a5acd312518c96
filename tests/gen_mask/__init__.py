"""Tests of the gen_mask package: the combiner registry, baselines, ERM/IRM benchmark, sweeps, leaderboard."""
