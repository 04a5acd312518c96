"""Tests of the and_mask package: the shared layer (core), data sets, models, experiments, paper analyses."""
