"""The one exception type for bad user input; the CLI renders it as `moegpt: error: <message>`."""


class MoegptError(Exception):
    """A problem the user can fix (bad flag, missing file, corrupt checkpoint). One line, no traceback."""
