"""One exception type for problems a user can fix; the CLI prints its message as one line."""


class HollownetError(ValueError):
    """A problem with the user's input or environment. The message names the problem and the fix.

    Every user-facing error is one (PhotoError, DatasetError, the evaluation's input errors): the CLI
    catches this type alone. A ValueError, so code that checked for ValueError before keeps working."""
