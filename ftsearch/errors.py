"""The exception types that reach the user as a message instead of a traceback."""


class FtsearchError(Exception):
    """A problem the user can fix (bad study file, missing data, unknown backbone...).

    The CLI prints its message and exits with status 2; nothing has been created when it is raised
    before the search starts.
    """


class BaselineUnavailable(FtsearchError):
    """The classical baseline cannot be fitted on this data (a TF-IDF vocabulary left empty by
    texts of numbers or symbols only): the search reports it and goes on without a baseline."""
