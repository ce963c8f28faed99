"""Where the files dlf ships beside its code (registries, task configs, toy models) live.

In a source checkout or an editable install they are the repository's top-level
``registry/``, ``tasks/`` and ``models/``; a regular install copies them into
``dlf_plugin/_bundled/`` (see ``setup.py``).
"""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_root() -> Path:
    """The folder holding ``registry/``, ``tasks/`` and ``models/``."""
    bundled = _PACKAGE / "_bundled"
    return bundled if bundled.is_dir() else _PACKAGE.parent
