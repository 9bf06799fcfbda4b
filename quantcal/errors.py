"""The one exception type a user can cause.

Every stage raises :class:`QuantcalError` for bad input (unknown data set, missing model,
wrong path, impossible budget, corrupted run directory). The CLI catches it and prints its
message on one line, so the message itself must say what was wrong and what to do.
"""


class QuantcalError(Exception):
    """An error the user can fix; its message says how."""
