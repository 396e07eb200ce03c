"""The one error type for bad user input.

`UserError` is raised wherever a file, flag, config field, plan or model folder supplied by the user is
unusable. The CLI (`mixbits.cli.common.user_errors`) prints it as one line, `error: <message>`, and exits
with status 2; every other exception is a bug or an environment failure and keeps its traceback.

The message names the file / field / layer, the bad value, and what is accepted or the fix. It subclasses
`ValueError` so that callers (and tests) that expect a ValueError for bad input keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad user input: the CLI prints it in one line with exit status 2; everything else keeps its traceback."""
