"""User-facing errors: one line that says what is wrong and how to fix it."""


class FastdiffError(Exception):
    """A problem with the user's input (config, paths, data). The CLI prints it as one line and exits 2."""


def read_text(path, what: str) -> str:
    """A text file the user gives (a config, prompts, a partition, an export's fastdiff.json), read as UTF-8; any
    other encoding is a one-line error naming the file and the setting (``what``) it came from."""
    from pathlib import Path

    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FastdiffError(f"{what} {path} is not UTF-8 text (byte {exc.start} of it); save it as UTF-8") from None
