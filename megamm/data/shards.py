"""Shard files: resolving a specification, opening shards (local files or ``pipe:`` commands),
reading their samples, and the per-shard sample-count index.

A shard specification (``data.train_shards``, ``data.eval_shards``, ``data.sources[i].shards``)
is one of, or a comma-separated list (or YAML list) of:

* a brace pattern: ``data/train/shard-{000000..000007}.tar`` or ``data/{a,b}.tar``,
* a glob: ``data/train/*.tar``,
* a directory: every ``*.tar`` directly inside it,
* a plain file path,
* a command whose standard output is the tar: ``pipe:aws s3 cp s3://bucket/train-{0000..0099}.tar -``
  or ``pipe:curl -s -L https://host/train-{0000..0099}.tar`` (brace-expanded, one command a shard).

A shard is read as a stream of samples: tar members grouped by key (the member path up to the
first dot of its file name; a leading ``./`` is dropped, so plain ``tar -C dir .`` output reads
the same as WebDataset's). :class:`ShardReader` can skip samples reading only the tar headers,
seeking over the data of local files, which is what makes resuming cheap.

The index (:data:`SIZES_FILE`, the OpenCLIP convention) gives each shard's sample count, by
file name; ``tools/make_shards.py`` writes it. The loader uses it to split an epoch over the
data-parallel streams by sample (not by shard), so shards of uneven sizes still give every
stream the same share.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from braceexpand import braceexpand

from megamm.config import ConfigError

_GLOB_CHARS = re.compile(r"[*?\[]")

PIPE_PREFIX = "pipe:"
"""A shard URL starting with this is a shell command whose standard output is the tar."""

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


def is_pipe(url: str) -> bool:
    """True for a ``pipe:`` shard (a command), False for a local file."""
    return str(url).startswith(PIPE_PREFIX)


def spec_parts(spec: str | Sequence[str]) -> list[str]:
    """The items of a specification: a YAML list's entries, or a string's comma-separated parts
    (commas inside braces do not split; a ``pipe:`` item runs to the end of its list entry)."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    parts: list[str] = []
    for entry in entries:
        pieces = _split_top_level(str(entry).strip())
        for index, piece in enumerate(pieces):
            if is_pipe(piece.strip()):  # a command may hold commas: it runs to the end of the entry
                parts.append(",".join(pieces[index:]).strip())
                break
            if piece.strip():
                parts.append(piece.strip())
    return parts


def expand_shards(spec: str | Sequence[str], field_name: str) -> list[str]:
    """All shards named by ``spec``: local paths sorted and de-duplicated, then ``pipe:`` commands
    in the order given (each brace-expanded to one command a shard).

    Args:
        spec: brace pattern, glob, directory, file or ``pipe:`` command, or a comma-separated
            list (or a list) of these.
        field_name: the config field the spec came from (``data.train_shards``), used in errors.

    Returns:
        Paths of existing files, then commands (whose output is not checked before reading).

    Raises:
        ConfigError: (a ValueError) the spec is empty or malformed, or names a file, glob or
            directory that yields nothing; the message names ``field_name`` and the fix.
    """
    shown = spec if isinstance(spec, str) else list(spec)
    parts = spec_parts(spec) if isinstance(spec, (str, list, tuple)) else []
    if not parts:
        raise ConfigError(f"{field_name} is empty; set it to the training shards, e.g. "
                          f"'demo_data/train/shard-{{000000..000007}}.tar'")
    paths: set[str] = set()
    commands: list[str] = []
    for part in parts:
        try:
            items = brace_expand(part)
        except ValueError as err:
            raise ConfigError(f"{field_name}={shown!r}: {err}; fix the brace pattern") from None
        for item in items:
            if is_pipe(item):
                if not item[len(PIPE_PREFIX):].strip():
                    raise ConfigError(f"{field_name}={shown!r}: 'pipe:' needs a command, e.g. 'pipe:cat shard.tar'")
                if item not in commands:
                    commands.append(item)
            else:
                paths.update(os.path.normpath(p) for p in _expand_one(item, str(shown), field_name))
    if not paths and not commands:
        raise ConfigError(f"{field_name}={shown!r} matched no files; {_FIX_HINT}")
    return sorted(paths) + commands


def check_shards_readable(paths: Iterable[str], field_name: str, read_header: bool) -> None:
    """Refuse shards this process cannot read, before any work starts.

    Every path is checked for read permission; with ``read_header`` its first tar header is
    also read and validated (cheap for a few evaluation shards, not meant for thousands).

    Raises:
        ConfigError: naming the field, the file and what is wrong with it.
    """
    for path in paths:
        if is_pipe(path):
            continue  # a command's output is checked as it is read
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


def shard_name(url: str) -> str:
    """The name a shard has in an index: a file's base name; for a ``pipe:`` command, the base
    name of its last argument that ends in ``.tar`` (the object it fetches), else the command."""
    if not is_pipe(url):
        return os.path.basename(url)
    try:
        words = shlex.split(url[len(PIPE_PREFIX):])
    except ValueError:
        words = url[len(PIPE_PREFIX):].split()
    named = [word for word in words if word.split("?")[0].endswith(".tar")]
    return os.path.basename(named[-1].split("?")[0]) if named else url


def read_index(path: str | Path) -> dict[str, int]:
    """A sample-count index (``{"shard-000000.tar": 1000, ...}``); {} if it is absent or unreadable."""
    try:
        with open(path) as handle:
            loaded = json.load(handle)
    except (OSError, ValueError):
        return {}
    if not isinstance(loaded, dict):
        return {}
    return {str(k): v for k, v in loaded.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 0}


def shard_sizes(urls: Sequence[str], index: str | Path | None = None) -> list[int] | None:
    """Each shard's sample count: from ``index`` if given, else from the :data:`SIZES_FILE` beside
    each local shard. None if any shard is missing from its index (``pipe:`` shards need ``index``)."""
    tables: dict[str, dict[str, int]] = {}
    sizes: list[int] = []
    for url in urls:
        if index is not None and str(index):
            table_path = str(index)
        elif is_pipe(url):
            return None
        else:
            table_path = os.path.join(os.path.dirname(url), SIZES_FILE)
        if table_path not in tables:
            tables[table_path] = read_index(table_path)
        count = tables[table_path].get(shard_name(url))
        if count is None:
            return None
        sizes.append(count)
    return sizes


def known_sample_count(paths: Iterable[str]) -> int | None:
    """Total samples in ``paths`` according to each directory's ``sizes.json``; None if any is unknown."""
    sizes = shard_sizes(list(paths))
    return None if sizes is None else sum(sizes)


# ----------------------------------------------------------------------------------------------
# Reading shards


def split_member_name(name: str) -> tuple[str, str] | None:
    """A tar member's (key, extension): ``"./a/b.seg.jpg"`` -> ``("a/b", "seg.jpg")``; None for a
    name without an extension (not part of any sample). Extensions are lower-cased."""
    while name.startswith("./"):
        name = name[2:]
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem or not extension:
        return None
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


class ShardError(Exception):
    """A shard could not be read on; ``reason`` is the bad-data category counted for it."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _CountingFile:
    """A raw (unbuffered) local file that counts the bytes it returns."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "rb", buffering=0)
        self.bytes_read = 0
        self.name = path

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size) if size is not None and size >= 0 else self._file.readall()
        data = data or b""
        self.bytes_read += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self._file.close()


class _CountingPipe:
    """The standard output of a ``pipe:`` command, counting the bytes it returns."""

    def __init__(self, url: str) -> None:
        self.command = url[len(PIPE_PREFIX):]
        self.process = subprocess.Popen(
            self.command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        self.bytes_read = 0
        self.name = url
        self._finished = False

    def read(self, size: int = -1) -> bytes:
        assert self.process.stdout is not None
        data = self.process.stdout.read(size) if size is not None and size >= 0 else self.process.stdout.read()
        self.bytes_read += len(data)
        return data

    def finish(self) -> str | None:
        """Wait for the command; its failure ("exit status 1: <stderr tail>"), or None."""
        if self._finished:
            return None
        self._finished = True
        assert self.process.stdout is not None and self.process.stderr is not None
        self.process.stdout.close()
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        stderr = self.process.stderr.read().decode("utf-8", "replace").strip()
        self.process.stderr.close()
        if code == 0:
            return None
        tail = stderr.splitlines()[-1][:300] if stderr else "no error output"
        return f"exit status {code}: {tail}"

    def close(self) -> None:
        """Stop the command if it still runs (the reader did not need the rest)."""
        if self.process.poll() is None:
            self.process.kill()
        self.finish()


class ShardReader:
    """The samples of one shard, in file order: ``{"__key__", "__url__", ext: bytes, ...}``.

    Opened lazily by the first :meth:`skip` or :meth:`next`. A problem with the shard (it cannot be
    opened, its tar data is truncated or corrupt, its ``pipe:`` command fails) ends it: the
    samples read so far stand, and :attr:`error` holds a :class:`ShardError`. A sample whose
    members repeat an extension is returned with ``"__error__"`` set instead of its members.
    """

    def __init__(self, url: str | Path) -> None:
        self.url = str(url)
        self.error: ShardError | None = None
        self.samples = 0
        """Samples returned or skipped so far."""
        self._source: _CountingFile | _CountingPipe | None = None
        self._tar: tarfile.TarFile | None = None
        self._pending: tuple[tarfile.TarInfo, str, str] | None = None
        self._done = False

    @property
    def bytes_read(self) -> int:
        """Bytes taken from the file or the command so far."""
        return self._source.bytes_read if self._source is not None else 0

    def _open(self) -> None:
        try:
            if is_pipe(self.url):
                self._source = _CountingPipe(self.url)
                self._tar = tarfile.open(fileobj=self._source, mode="r|")  # type: ignore[call-overload]
            else:
                self._source = _CountingFile(self.url)
                self._tar = tarfile.open(fileobj=self._source, mode="r:")  # type: ignore[call-overload]
        except OSError as err:
            self._fail("shard_unreadable", f"cannot open ({err.strerror or err})")
        except tarfile.TarError as err:
            self._fail(*self._tar_problem(err))

    def _tar_problem(self, err: Exception) -> tuple[str, str]:
        failure = self._source.finish() if isinstance(self._source, _CountingPipe) else None
        if failure is not None:
            return "pipe_failed", f"command failed ({failure})"
        text = str(err)
        if "unexpected end" in text or "truncated" in text or isinstance(err, EOFError):
            return "tar_truncated", f"truncated tar ({text})"
        if self.samples == 0 and self._tar is None:
            return "shard_unreadable", f"not a tar file ({text})"
        return "tar_corrupt", f"corrupt tar data ({text})"

    def _fail(self, reason: str, detail: str) -> None:
        if self.error is None:
            self.error = ShardError(reason, f"{self.url}: {detail}")
        self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        source = self._source
        if isinstance(source, _CountingPipe):
            if self.error is None:
                failure = source.finish()
                if failure is not None:
                    self.error = ShardError("pipe_failed", f"{self.url}: command failed ({failure})")
            else:
                source.close()
        elif source is not None:
            source.close()

    def _next_header(self) -> tarfile.TarInfo | None:
        """The next tar header, None at the end-of-archive marker (or a clean end of the file).

        What ``TarFile.next`` does, except that a truncated or corrupt header is an error here,
        where ``TarFile.next`` ends the archive silently.
        """
        tar = self._tar
        assert tar is not None
        if tar.firstmember is not None:
            info, tar.firstmember = tar.firstmember, None
            return info
        if tar.offset != tar.fileobj.tell():  # past the previous member's data, by seeking (or reading a pipe)
            if tar.offset == 0:
                return None  # the archive's first block was its end marker: no members
            tar.fileobj.seek(tar.offset - 1)
            if not tar.fileobj.read(1):
                raise tarfile.ReadError("unexpected end of data")
        try:
            return tarfile.TarInfo.fromtarfile(tar)
        except (tarfile.EOFHeaderError, tarfile.EmptyHeaderError):
            return None
        except tarfile.TruncatedHeaderError as err:
            raise tarfile.ReadError(f"truncated header ({err})") from None
        except tarfile.HeaderError as err:
            raise tarfile.ReadError(f"invalid header ({err})") from None

    def _next_member(self) -> tuple[tarfile.TarInfo, str, str] | None:
        """The next regular member that belongs to a sample: (info, key, extension)."""
        if self._pending is not None:
            member, self._pending = self._pending, None
            return member
        if self._done:
            return None
        if self._tar is None:
            self._open()
            if self._done:
                return None
        assert self._tar is not None
        while True:
            try:
                info = self._next_header()
            except (tarfile.TarError, OSError, EOFError) as err:
                self._fail(*self._tar_problem(err))
                return None
            if info is None:
                self._finish()
                return None
            if not info.isfile():
                continue
            split = split_member_name(info.name)
            if split is not None:
                return info, split[0], split[1]

    def _next_of(self, key: str) -> tuple[tarfile.TarInfo, str, str] | None:
        """The next member if it belongs to sample ``key``; else None (the member is kept for later)."""
        member = self._next_member()
        if member is not None and member[1] != key:
            self._pending = member
            return None
        return member

    def skip(self, count: int) -> int:
        """Pass over ``count`` samples reading only tar headers; returns how many were there."""
        skipped = 0
        while skipped < count:
            first = self._next_member()
            if first is None:
                break
            while self._next_of(first[1]) is not None:
                pass
            skipped += 1
        self.samples += skipped
        return skipped

    def next(self) -> dict[str, Any] | None:
        """The next sample, or None at the end of the shard (or at its first problem)."""
        first = self._next_member()
        if first is None:
            return None
        info, key, extension = first
        sample: dict[str, Any] = {"__key__": key, "__url__": self.url}
        duplicate = None
        while True:
            assert self._tar is not None
            try:
                handle = self._tar.extractfile(info)
                data = handle.read() if handle is not None else b""
            except (tarfile.TarError, OSError, EOFError) as err:
                self._fail(*self._tar_problem(err))
                return None
            if extension in sample:
                duplicate = extension
            sample[extension] = data
            member = self._next_of(key)
            if member is None:
                break
            info, _, extension = member
        self.samples += 1
        if self.error is not None and self.error.reason in ("tar_truncated", "tar_corrupt"):
            return None  # the sample's last member may be cut short: not a sample
        if duplicate is not None:
            return {"__key__": key, "__url__": self.url, "__error__": f"member {key}.{duplicate} appears twice"}
        return sample

    def close(self) -> None:
        """Release the file, or stop the command if it still runs (its failure is not counted then:
        the reader did not need the rest)."""
        if not self._done:
            self._done = True
            if self._source is not None:
                self._source.close()


def iter_shard_samples(urls: Iterable[str | Path], on_error: Callable[[ShardError], None]) -> Iterator[dict[str, Any]]:
    """Every sample of ``urls``, shard after shard; each shard's problem goes to ``on_error``."""
    for url in urls:
        reader = ShardReader(str(url))
        try:
            while (sample := reader.next()) is not None:
                yield sample
        finally:
            reader.close()
        if reader.error is not None:
            on_error(reader.error)
