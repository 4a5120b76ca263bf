"""Error type shared by the data preparation scripts (Omniglot, miniImageNet)."""


class DataPrepError(Exception):
    """Bad or missing input data.

    The message says what is wrong (naming the file, class, shape ... involved)
    and what to do about it. Command-line entry points print it to stderr and
    exit with status 2, without a traceback.
    """
