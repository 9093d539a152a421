"""The one exception type for mistakes a user can make and fix (a config value, a path, a file).

The CLI prints a ``UserError`` as ``error: <message>`` and exits with status 2; every other
exception is a bug and keeps its traceback. Raise it with one sentence naming the cause and the fix.
"""


class UserError(ValueError):
    """A mistake in the configuration, the command line or the files it names; the message says how to fix it."""
