"""Where a model or dataset name points, decided before anything is downloaded.

A name is a ``pkg://`` path (a file shipped in a package), a local folder, or a Hugging Face hub
id. For a hub id the hub endpoint (``HF_ENDPOINT``) is asked once per process, with a short
timeout: huggingface_hub and datasets retry an unreachable hub for about a minute and then fail
with a long traceback. When the probe fails, or ``HF_HUB_OFFLINE=1`` is set, the name is read
from the local cache only; when it is not cached, the run stops with one line that names the id
and says what to do.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from cpo_exp.assets import PKG_SCHEME, locate as locate_asset
from cpo_exp.config import ConfigError

log = logging.getLogger("cpo_exp")

PROBE_TIMEOUT = 3.0  # seconds; the hub answers in well under one where it can be reached
# "name" or "owner/name" (huggingface_hub's repo-id rule, loosely); anything else is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class HubError(ConfigError):
    """A hub id that can be neither downloaded nor read from the local cache."""


@dataclass(frozen=True)
class Location:
    """What to hand to ``from_pretrained``/``load_dataset``, and whether only the cache may be read."""

    path: str
    local_files_only: bool = False


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``), as huggingface_hub reads it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=None)
def unreachable(url: str) -> Optional[str]:
    """None when ``url`` answers (any HTTP status will do), else why not, in a few words."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT).close()
    except urllib.error.HTTPError:
        return None  # an answer, even 4xx/5xx, means the hub is there
    except urllib.error.URLError as err:
        reason = err.reason
        return f"no answer within {PROBE_TIMEOUT:g} s" if isinstance(reason, socket.timeout) else str(reason)
    except (socket.timeout, TimeoutError):
        return f"no answer within {PROBE_TIMEOUT:g} s"
    except OSError as err:
        return str(err)
    return None


def local_path(name: str, key: str) -> Optional[Path]:
    """The folder or file ``name`` names on this machine, or None when it is to be a hub id.

    A name that looks like a path (several slashes, ``./``, ``/``, ``~``) but does not exist is a
    FileNotFoundError that names the absolute path it was resolved to.
    """
    if name.startswith(PKG_SCHEME):
        return Path(locate_asset(name))
    path = Path(name).expanduser()
    if path.exists():
        return path
    if _HUB_ID.match(name):
        return None
    raise FileNotFoundError(f"{key}={name}: no such file or folder (resolved to {path.absolute()}, "
                            f"from the launch dir {Path.cwd()}); a hub id is 'owner/name'")


def _advice(key: str, kind: str) -> str:
    if kind == "model":
        return (f"point {key} at a local folder (one written by save_pretrained, or the model's hub files "
                "copied from a machine with network, e.g. by `hf download <id> --local-dir <folder>`)")
    return (f"point {key} at a local folder (a save_to_disk folder or a folder of data files), "
            "or use data=files data.train_files=[...]")


def _not_cached(key: str, name: str, kind: str, why: str, cache: str) -> HubError:
    return HubError(f"{key}={name}: {why}, and the {kind} is not in the local cache ({cache}); {_advice(key, kind)}")


def _why_cache_only() -> Optional[str]:
    """Why only the cache may be read (offline, or the hub does not answer), or None."""
    if offline():
        return "HF_HUB_OFFLINE is set"
    reason = unreachable(endpoint())
    return None if reason is None else f"the Hugging Face hub cannot be reached ({endpoint()}: {reason})"


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning("%s", message)  # the tokenizer, the config and the weights each ask


def locate_model(name: str, key: str, revision: Optional[str] = None) -> Location:
    """A model or tokenizer name as ``from_pretrained`` should get it."""
    path = local_path(name, key)
    if path is not None:
        return Location(str(path))
    why = _why_cache_only()
    if why is None:
        return Location(name)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(name, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError:
        raise _not_cached(key, name, "model", why, constants.HF_HUB_CACHE) from None
    if not offline():
        _warn_once(f"{why}; {key}={name} is read from the local cache")
    return Location(name, local_files_only=True)


def locate_dataset(name: str, key: str) -> Location:
    """A dataset name as ``load_dataset`` should get it; see :func:`load_cached_dataset`."""
    path = local_path(name, key)
    if path is not None:
        return Location(str(path))
    return Location(name, local_files_only=_why_cache_only() is not None)


def load_cached_dataset(location: Location, key: str, name: Optional[str], split: str):
    """``load_dataset`` of a hub id from the local cache alone (``datasets``' offline mode)."""
    import datasets

    why = _why_cache_only() or "the hub cannot be reached"
    with _datasets_offline():
        try:
            dataset = datasets.load_dataset(location.path, name, split=split)
        except ConnectionError:  # what datasets raises offline for a dataset it has not cached
            raise _not_cached(key, location.path, "dataset", why, datasets.config.HF_DATASETS_CACHE) from None
    if not offline():
        _warn_once(f"{why}; {key}={location.path} is read from the local cache")
    return dataset


@contextlib.contextmanager
def _datasets_offline() -> Iterator[None]:
    # datasets reads HF_HUB_OFFLINE once, at import; its loader checks this flag before each hub
    # request and then falls back to its cache, which is exactly "cache only, no retries".
    import datasets

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before

