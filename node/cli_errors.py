"""The error every ``pacsnode`` command raises for a mistake the user can fix.

In a module of its own so that the command modules (``cli_web`` and others) raise the
same class that ``node.cli.main`` catches, also when ``node.cli`` runs as ``__main__``.
"""


class CLIError(Exception):
    """An error the user can fix; printed without a traceback, exit status 2."""
