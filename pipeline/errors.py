"""The one exception the pipeline raises for problems the user can fix (bad input, bad config)."""


class PipelineError(Exception):
    """A user-facing error: the message names what is wrong, where, and what would be right.

    `python -m pipeline` prints it as one line and exits with status 2, leaving no partial output.
    """
