"""Refusals a user can act on, printed as one line without a traceback.

A step refuses bad input (a malformed file, a bad option, a checkpoint it will not unpickle) by
raising an `InputError` whose message names the file or option and the problem. `one_line_errors`
wraps a step's `main` so that such a refusal ends the process with `error: <message>` on stderr
and exit status 1; any other exception is a bug and keeps its traceback.
"""

import functools


class InputError(ValueError):
    """Bad input: the message names the file (row, key or option) and the problem, on one line."""


def one_line_errors(main):
    """Decorate a step's `main(argv)`: an InputError becomes `SystemExit("error: ...")`."""

    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except InputError as err:
            raise SystemExit(f"error: {' '.join(str(err).split())}") from None

    return wrapped
