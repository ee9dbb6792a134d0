"""One exception type for problems a user can fix; the CLI prints its message as one line."""


class HollownetError(Exception):
    """A problem with the user's input or environment. The message names the problem and the fix."""
