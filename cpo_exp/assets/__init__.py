"""Files shipped inside the package: the embedded tiny model and the toy translation set.

Configs refer to them as ``pkg://cpo_exp/assets/<name>`` so that a resolved config is the
same on every machine; :func:`locate` turns such a URI into a real path.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PKG_SCHEME = "pkg://"


def locate(path: str) -> str:
    """Resolve ``pkg://<package>/<file>`` inside an installed package; return other paths as given."""
    if not path.startswith(PKG_SCHEME):
        return path
    package, _, relative = path[len(PKG_SCHEME):].partition("/")
    resolved = Path(str(resources.files(package))) / relative
    if not resolved.exists():
        raise FileNotFoundError(f"{path}: no such file in the installed package ({resolved})")
    return str(resolved)
