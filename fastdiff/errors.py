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


def refuse_replacing(folder, setting: str, inputs: dict | None = None, may_hold: tuple = ()) -> None:
    """Refuse, in one line naming ``setting``, a folder that a command writes and, with --overwrite, deletes first
    when it is the working directory or holds it, or when it is, holds or is already a part of one of ``inputs``
    ({role: path}; a role in ``may_hold`` may hold it, as a run folder holds its exports). Inputs that are not local
    paths (hub ids) are passed over."""
    from pathlib import Path

    out, cwd = Path(folder).resolve(), Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise FastdiffError(f"{setting} {folder or '(empty)'} is the working directory or holds it, which --overwrite "
                            "would delete; give a folder of its own")
    for role, source in (inputs or {}).items():
        if not source or not Path(source).exists():
            continue
        path = Path(source).resolve()
        if out == path:
            raise FastdiffError(f"{setting} {folder} is the {role} folder itself; give another folder")
        if out in path.parents:
            kind = "folder" if path.is_dir() else "file"
            raise FastdiffError(f"{setting} {folder} holds the {role} {kind} {source}, which writing it would "
                                "replace; give another folder")
        if path in out.parents and role not in may_hold and out.exists():  # a part of the input; a new subfolder is not
            raise FastdiffError(f"{setting} {folder} lies inside the {role} folder {source}, which writing it would "
                                "change; give a folder outside it")


def script_main(main):
    """``main`` of an eval/ script, as the CLI runs a command: a FastdiffError is one ``NAME: error:`` line on
    stderr and exit status 2, not a traceback."""
    import functools
    import sys
    from pathlib import Path

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except FastdiffError as exc:
            print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    return run
