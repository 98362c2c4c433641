"""The error type for bad input: the entry scripts report it as one line with exit status 2
(util/cli.run_main). Here, not in util/cli, so that the model and the library raise it without
importing the command-line module."""


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2, no traceback."""
