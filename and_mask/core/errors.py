"""Expected failures of a run, reported to the user as one line and a non-zero exit."""


class RunError(Exception):
    """Bad data, a missing data set, a non-finite loss, a resume that does not match, ..."""


class NonFiniteLossError(RunError):
    pass


class DataNotFoundError(RunError):
    pass
