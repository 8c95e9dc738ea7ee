"""Hugging Face Hub repository ids -> local paths, through ``huggingface_hub``'s cache.

``resolve("HuggingFaceTB/SmolLM2-135M-Instruct")`` returns the cached snapshot directory;
``resolve("timm/starnet_s1.in1k", filename="model.safetensors")`` one file in it. A local file or
directory is returned as it is. The cache is read first (``local_files_only=True``), so a cached
repository works offline; only when it is missing, and downloads are allowed, is it fetched.
``HF_HUB_OFFLINE=1`` (or ``download=False``) never touches the network: a missing repository or file
then raises :class:`HubNotCachedError` saying what is missing and where the cache was looked for.

The cache is the standard one (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``),
read when ``resolve`` is called, laid out as ``models--org--name/{refs/<branch>, snapshots/<sha>/..., blobs/}``.
A ``hf-hub:`` prefix (timm's spelling) is accepted and dropped.
"""
from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from pathlib import Path

__all__ = ["resolve", "is_repo_id", "cache_dir", "offline", "HubNotCachedError", "HF_HUB_PREFIX"]

HF_HUB_PREFIX = "hf-hub:"
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")


class HubNotCachedError(FileNotFoundError):
    """A hub repository (or a file of it) is not in the local cache and may not be downloaded."""


def is_repo_id(name: str | os.PathLike) -> bool:
    """``org/name`` or ``hf-hub:org/name`` (optionally ``@revision``, or ``org/name/path/in/repo``
    for one file), and not an existing path."""
    if not isinstance(name, str) or Path(name).exists():
        return False
    prefixed = name.startswith(HF_HUB_PREFIX)
    s = name[len(HF_HUB_PREFIX):] if prefixed else name
    s = s.split("@", 1)[0]
    parts = s.split("/")
    if prefixed and len(parts) == 1:
        return bool(_REPO_ID.match(s))
    # without the prefix, only org/name[/file] (a bare word is more likely a mistyped local path)
    return (len(parts) >= 2 and not s.startswith((".", "~")) and bool(_REPO_ID.match("/".join(parts[:2])))
            and all(_PART.match(p) and p not in (".", "..") for p in parts))


def cache_dir() -> Path:
    """The hub cache ``huggingface_hub`` uses, from the environment as it is now."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once, at import)."""
    v = os.environ.get("HF_HUB_OFFLINE")
    if v is not None:
        return v.strip().upper() in ("1", "ON", "YES", "TRUE")
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def _split(repo: str, revision: str | None) -> tuple[str, str | None, str | None]:
    """``(repo id, revision, file in the repo)`` of ``[hf-hub:]org/name[/file...][@revision]``."""
    repo = repo[len(HF_HUB_PREFIX):] if repo.startswith(HF_HUB_PREFIX) else repo
    if "@" in repo:
        repo, rev = repo.split("@", 1)
        if revision is not None and revision != rev:
            raise ValueError(f"two revisions given: {rev!r} in the id and revision={revision!r}")
        revision = rev
    parts = repo.split("/")
    return "/".join(parts[:2]), revision, ("/".join(parts[2:]) or None)


def resolve(repo_or_path: str | os.PathLike, *, filename: str | None = None,
            allow_patterns: str | Sequence[str] | None = None, revision: str | None = None,
            cache: str | os.PathLike | None = None, download: bool | None = None,
            repo_type: str = "model") -> Path:
    """A local path for ``repo_or_path``.

    Args:
      repo_or_path: an existing file or directory (returned unchanged, as a Path) or a hub id
        ``org/name`` (``hf-hub:org/name``, ``org/name@revision`` also accepted); ``org/name/file``
        names one file of the repository (``.../model.Q4_K_M.gguf``), as ``filename`` does.
      filename: return this file of the repository instead of its snapshot directory.
      allow_patterns: the files needed from the repository (glob patterns, as ``snapshot_download``
        takes them); each pattern must match a cached file, else the repository counts as missing.
      revision: a branch, tag or commit sha (default ``main``).
      cache: the hub cache directory (default :func:`cache_dir`).
      download: allow downloading what is not cached (default: unless ``HF_HUB_OFFLINE`` is set).
    """
    path = Path(repo_or_path).expanduser()
    if path.exists():
        if filename is not None and path.is_dir():
            f = path / filename
            if not f.exists():
                raise FileNotFoundError(f"{filename} not found in {path}")
            return f
        return path
    name = os.fspath(repo_or_path)
    if not is_repo_id(name):
        raise FileNotFoundError(f"{name} is neither an existing path nor a hub repository id (org/name)")
    repo, revision, in_repo = _split(name, revision)
    if in_repo is not None:
        if filename is not None and filename != in_repo:
            raise ValueError(f"two files given: {in_repo!r} in the id and filename={filename!r}")
        filename = in_repo
    cache = Path(cache).expanduser() if cache is not None else cache_dir()
    if download is None:
        download = not offline()
    patterns = [filename] if filename is not None else (
        [allow_patterns] if isinstance(allow_patterns, str) else list(allow_patterns or []))

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    def local():
        try:
            snap = Path(snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True,
                                          allow_patterns=patterns or None, repo_type=repo_type))
        except (LocalEntryNotFoundError, FileNotFoundError, OSError):
            return None, patterns or ["(any file)"]
        missing = [p for p in patterns if not _matches(snap, p)]
        return snap, missing

    snap, missing = local()
    failure = None
    if missing and download:
        try:
            snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=patterns or None,
                              repo_type=repo_type)
        except Exception as e:   # no network, no such repo, gated, ...: say so with the cache's view
            failure = e
        snap, missing = local()
    if missing or snap is None:
        where = f"{cache}/{repo_type}s--{repo.replace('/', '--')}"
        what = "the repository" if snap is None else f"{', '.join(missing)} in snapshot {snap.name}"
        why = ("HF_HUB_OFFLINE is set, so nothing is downloaded" if offline() else
               "downloads were disabled (download=False)" if not download else
               f"the download failed ({type(failure).__name__}: {failure})" if failure is not None else
               "the download did not provide it")
        raise HubNotCachedError(
            f"hub repository {repo!r} (revision {revision or 'main'}): {what} is not in the local cache "
            f"({where}); {why}. Fetch it on a connected machine (huggingface-cli download {repo}) and "
            f"copy the cache, or point HF_HUB_CACHE / HF_HOME at a cache that has it.") from failure
    return snap / filename if filename is not None else snap


def _matches(snapshot: Path, pattern: str) -> bool:
    if not any(ch in pattern for ch in "*?["):
        return (snapshot / pattern).exists()
    for root, _, files in os.walk(snapshot):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), snapshot)
            if fnmatch.fnmatch(rel, pattern) and os.path.exists(os.path.join(root, f)):
                return True
    return False
