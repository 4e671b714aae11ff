"""Named configs: the YAML files of this folder, given by name (``--config quickstart``)."""
from importlib import resources


def named_configs() -> list[str]:
    """The names ``--config`` takes besides a path (light: the CLI's help lists them without importing torch)."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))
