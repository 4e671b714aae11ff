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


def read_json_object(path, fix: str) -> dict:
    """A JSON object file fastdiff wrote or reads (fastdiff.json, model_index.json); damaged or not an object, a
    one-line error ending in ``fix`` (what to do about it)."""
    import json

    try:
        data = json.loads(read_text(path, "JSON file"))
    except ValueError as exc:
        raise FastdiffError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise FastdiffError(f"{path} holds no JSON object; {fix}")
    return data


def file_on_path(folder):
    """The first existing file on the way to ``folder`` (the folder itself or a parent), where a folder is to be
    written: a command refuses it before doing anything, else mkdir fails after the slow part. None if there is none."""
    from pathlib import Path

    folder = Path(folder)
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def require_folder_path(folder, setting: str) -> None:
    """Refuse, in one line naming ``setting`` (``--out``, ``output_dir``, ...), a folder to be written that is a
    file or lies under one."""
    if (blocker := file_on_path(folder)) is not None:
        raise FastdiffError(f"{setting} {folder}: {blocker} is a file; give a folder")
