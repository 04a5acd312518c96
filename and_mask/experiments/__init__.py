"""Experiment definitions: flags, checks and the TrainSetup each `run_*` module trains."""
