"""User-facing errors: one line that says what is wrong and how to fix it."""


class FastdiffError(Exception):
    """A problem with the user's input (config, paths, data). The CLI prints it as one line and exits 2."""
