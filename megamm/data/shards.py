"""Shard files: resolving a specification, reading samples, writing files atomically.

A shard specification (``data.train_shards``, ``data.eval_shards``) is one of, or a comma-separated list of:

* a brace pattern: ``data/train/shard-{000000..000007}.tar`` or ``data/{a,b}.tar``,
* a glob: ``data/train/*.tar``,
* a directory: every ``*.tar`` directly inside it,
* a plain file path.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from braceexpand import braceexpand
from webdataset import tariterators

from megamm.config import ConfigError

_GLOB_CHARS = re.compile(r"[*?\[]")

SIZES_FILE = "sizes.json"
"""Per-directory sample counts, ``{"shard-000000.tar": 1024, ...}`` (the OpenCLIP convention)."""

_FIX_HINT = "run tools/make_demo_data.py or fix the path"


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split ``text`` on ``sep`` where it is not inside braces."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def brace_expand(pattern: str) -> list[str]:
    """Expand shell-style braces: ``a{0..2}b`` -> ``[a0b, a1b, a2b]``, ``{x,y}`` -> ``[x, y]``.

    Ranges keep zero padding (``{000..002}``); groups may nest. A brace group without a comma
    or range (``{x}``) is kept literally, as in bash.

    Raises:
        ValueError: the braces are unbalanced.
    """
    return list(braceexpand(pattern))


def _expand_one(item: str, spec: str, field_name: str) -> list[str]:
    """Existing .tar paths for one (brace-free) item of a specification."""
    path = os.path.expanduser(item)
    if os.path.isdir(path):
        found = sorted(str(p) for p in Path(path).glob("*.tar") if p.is_file())
        if not found:
            raise ConfigError(
                f"{field_name}={spec!r}: directory {path!r} contains no .tar shards; {_FIX_HINT}"
            )
        return found
    if _GLOB_CHARS.search(path):
        found = sorted(p for p in glob.glob(path) if os.path.isfile(p))
        if not found:
            raise ConfigError(f"{field_name}={spec!r}: {item!r} matched no files; {_FIX_HINT}")
        return found
    if not os.path.isfile(path):
        raise ConfigError(f"{field_name}={spec!r}: shard {path!r} does not exist; {_FIX_HINT}")
    return [path]


def expand_shards(spec: str, field_name: str) -> list[str]:
    """All shard files named by ``spec``, sorted and de-duplicated.

    Args:
        spec: brace pattern, glob, directory, file, or a comma-separated list of these.
        field_name: the config field the spec came from (``data.train_shards``), used in errors.

    Returns:
        Paths of existing files, sorted, each listed once.

    Raises:
        ConfigError: (a ValueError) the spec is empty or malformed, or names a file, glob or
            directory that yields nothing; the message names ``field_name`` and the fix.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{field_name} is empty; set it to the training shards, e.g. "
                          f"'demo_data/train/shard-{{000000..000007}}.tar'")
    paths: set[str] = set()
    for part in _split_top_level(spec):
        part = part.strip()
        if not part:
            continue
        try:
            items = brace_expand(part)
        except ValueError as err:
            raise ConfigError(f"{field_name}={spec!r}: {err}; fix the brace pattern") from None
        for item in items:
            paths.update(os.path.normpath(p) for p in _expand_one(item, spec, field_name))
    if not paths:
        raise ConfigError(f"{field_name}={spec!r} matched no files; {_FIX_HINT}")
    return sorted(paths)


def check_shards_readable(paths: Iterable[str], field_name: str, read_header: bool) -> None:
    """Refuse shards this process cannot read, before any work starts.

    Every path is checked for read permission; with ``read_header`` its first tar header is
    also read and validated (cheap for a few evaluation shards, not meant for thousands).

    Raises:
        ConfigError: naming the field, the file and what is wrong with it.
    """
    for path in paths:
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{field_name}: shard {path} is not readable (permissions); fix them or the path")
        if not read_header:
            continue
        try:
            with open(path, "rb") as handle:
                block = handle.read(tarfile.BLOCKSIZE)
        except OSError as err:
            raise ConfigError(f"{field_name}: shard {path} cannot be read ({err.strerror}); fix the file") from None
        try:
            tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            raise ConfigError(
                f"{field_name}: shard {path} is empty or truncated; rewrite it or remove it from the specification"
            ) from None
        except tarfile.HeaderError:
            raise ConfigError(
                f"{field_name}: shard {path} is not a tar file (its first header does not parse); "
                "rewrite it or remove it from the specification"
            ) from None


def known_sample_count(paths: Iterable[str]) -> int | None:
    """Total samples in ``paths`` according to each directory's ``sizes.json``; None if any is unknown."""
    tables: dict[str, dict[str, Any]] = {}
    total = 0
    for path in paths:
        directory, name = os.path.split(path)
        if directory not in tables:
            try:
                with open(os.path.join(directory, SIZES_FILE)) as handle:
                    loaded = json.load(handle)
                tables[directory] = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                tables[directory] = {}
        count = tables[directory].get(name)
        if not isinstance(count, int) or isinstance(count, bool):
            return None
        total += count
    return total


def _open_shards(
    paths: Iterable[str | Path], handler: Callable[[Exception], bool]
) -> Iterator[dict[str, Any]]:
    """``{"url", "stream"}`` per shard; each file is closed once the next one is requested."""
    for path in paths:
        try:
            handle = open(path, "rb")
        except OSError as err:
            if handler(err):
                continue
            return
        with handle:
            yield {"url": str(path), "stream": handle}


def iter_tar_samples(
    paths: Iterable[str | Path], handler: Callable[[Exception], bool]
) -> Iterator[dict[str, Any]]:
    """WebDataset samples (``{"__key__", "__url__", ext: bytes, ...}``) of the shards, in order.

    ``handler`` gets every error (unreadable file, broken tar member, duplicate member) and
    returns True to skip past it or False to stop.
    """
    files = tariterators.tar_file_expander(_open_shards(paths, handler), handler=handler)
    return tariterators.group_by_keys(files, handler=handler)
