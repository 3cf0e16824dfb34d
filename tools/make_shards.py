"""Write WebDataset tar shards from images, captions, audio and questions, with a sizes.json index.

Examples::

    # a folder tree: a/b/0001.jpg + a/b/0001.txt (+ a/b/0001.flac, a/b/0001.json) -> sample a/b/0001
    python tools/make_shards.py --from-folder photos/ --out shards/train

    # a manifest (.csv with a header row, or .jsonl); relative paths against --root
    python tools/make_shards.py --from-manifest vqa.jsonl --out shards/vqa --max-bytes 500M --workers 8

    # COCO captions: every caption of an image in one sample
    python tools/make_shards.py --from-coco annotations/captions_train2017.json --images train2017/ \\
        --out shards/coco --max-samples 5000 --shuffle --seed 1

Inputs (exactly one):

* ``--from-folder DIR``: files are grouped by stem, the path relative to DIR without its
  extension (``a/b/0001.jpg`` + ``a/b/0001.txt`` + ``a/b/0001.flac`` -> sample ``a/b/0001``).
  Recognised extensions (any case): images ``jpg jpeg png webp``, audio ``wav flac``, the caption
  ``txt`` (the whole file is one caption) and ``json`` (carried as is; it must be a JSON
  object, which the loader reads ``caption``/``captions``, ``question`` and ``answers`` from).
  Other files are ignored and counted.
* ``--from-manifest FILE``: one sample per CSV row or JSONL line; columns/keys ``image`` and
  ``audio`` (file paths, relative ones against ``--root``, default the manifest's directory),
  ``caption`` (a string) and/or ``captions`` (a list; in a CSV cell, a JSON list), ``question``,
  ``answers`` (a list; in a CSV cell, a JSON list) and/or ``answer`` (a string), and ``key``.
  Without ``key`` the sample's key is its image path (else its audio path) relative to the root,
  without the extension (the file name's stem for a path outside the root). Empty cells count as
  absent; other columns are ignored. A question needs at least one answer.
* ``--from-coco CAPTIONS_JSON --images DIR``: the COCO captions format, ``{"images": [{"id",
  "file_name"}], "annotations": [{"image_id", "caption"}]}``; the key is ``file_name`` without
  its extension, and all captions of an image (in file order) go into one sample.

A sample is kept when it holds a pair the loader trains on: an image or audio with a caption, a
question or (from a folder) a ``json`` file; or an image with audio.

Sample layout in a shard (the loader reads exactly this)::

    <key>.<ext>    the image: the original file's bytes, never re-encoded; ext is the file's
                   lower-cased extension (jpg, jpeg, png or webp)
    <key>.<ext>    the audio: the original file's bytes; ext wav or flac
    <key>.txt      the caption, UTF-8, when the sample has exactly one caption and no question
    <key>.json     otherwise, UTF-8 JSON with only the fields the sample has:
                   {"captions": ["...", ...], "question": "...", "answers": ["...", ...]};
                   from --from-folder, the sample's own .json file, byte for byte (beside
                   its .txt if it has one)

Members of a sample are consecutive, in that order. Captions, questions and answers are stripped of
surrounding whitespace; empty ones are dropped (a sample whose captions are all empty is skipped).
Images must open with PIL and audio with soundfile (only their headers are read). Keys contain no dots (WebDataset splits a member's
extension at the first dot of its base name): every dot of a stem is replaced by ``_``
(``img.v2.jpg`` -> key ``img_v2``), and two sources with the same key are refused, naming both.

Shards hold at most ``--max-samples`` samples (default 1000; 0: no count limit) and, with
``--max-bytes`` (``1G``, ``500M``, ``64K``: powers of 1024; or plain bytes), are at most that many
bytes as files (headers and padding included; a sample larger than that goes alone in its shard). The same input and arguments give byte-identical shards
for any ``--workers``: samples are sorted by key (or shuffled by ``--seed`` with ``--shuffle``),
packed into shards in that order, and every member has mtime 0, uid/gid 0, empty user and group
names and mode 0644. A tar has no padding past its two closing zero blocks.

Output in ``--out``: ``<prefix>-000000.tar ...`` and ``sizes.json`` (``{"<prefix>-000000.tar":
count, ...}``, which the loader uses for epochs and exact resume), each written atomically. A
directory that already holds ``.tar`` files or a ``sizes.json`` is refused unless ``--force``, which
also deletes ``<prefix>-NNNNNN.tar`` shards of an earlier run that this run did not rewrite.

Samples that cannot be used (a missing or unreadable file, an empty caption, ...) are skipped and
counted by reason; the last line printed sums up shards, samples, bytes and skips.

Exit status: 0 on success; 1 if a sample was skipped and ``--strict`` was given, or if no sample
was usable (nothing is written then); 2 on a usage error (bad arguments, an unreadable manifest, a
missing ``--images`` folder, duplicate keys, an output directory that holds shards).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import json
import multiprocessing
import os
import random
import re
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence, TypeVar

from tqdm import tqdm

from megamm.fileio import atomic_output, fsync_path

SIZES_FILE = "sizes.json"
"""The loader's per-directory sample counts (``megamm.data.shards.SIZES_FILE``; not imported from
there because ``megamm.data`` imports torch, which would cost this tool seconds per start)."""

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTENSIONS = ("wav", "flac")
_KINDS: dict[str, str] = {
    **{ext: "image" for ext in IMAGE_EXTENSIONS},
    **{ext: "audio" for ext in AUDIO_EXTENSIONS},
    "txt": "caption",
    "json": "json",
}
_BLOCK = tarfile.BLOCKSIZE  # 512
_USTAR_NAME = tarfile.LENGTH_NAME  # longer names (or non-ASCII ones) get a pax header
_USTAR_SIZE = 8**11  # larger sizes get a pax header
_END_OF_ARCHIVE = b"\0" * (2 * _BLOCK)
_MAX_WARNINGS = 10
_PREPARE_BATCH = 256
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}

T = TypeVar("T")
R = TypeVar("R")


class UsageError(ValueError):
    """The command cannot run as given; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------
# Samples as found in the input, as checked, as written (with slots: millions of them stay small)


@dataclass(slots=True)
class Source:
    """One sample as found in the input, before any of its files is read."""

    key: str
    origin: str
    """Where it comes from, for messages: a file (``a/b/0001.jpg``) or a manifest line."""
    image: str | None = None
    audio: str | None = None
    caption_file: str | None = None
    json_file: str | None = None
    captions: tuple[str, ...] = ()
    question: str | None = None
    answers: tuple[str, ...] = ()


@dataclass(slots=True)
class Skipped:
    """A sample left out, with the reason it is counted under and the details for a warning."""

    reason: str
    origin: str
    detail: str = ""

    def message(self) -> str:
        return f"skipped {self.origin}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass(slots=True)
class Member:
    """A file of a sample in the tar: copied from ``path``, or ``data`` itself."""

    name: str
    size: int
    path: str | None = None
    data: bytes | None = None


@dataclass(slots=True)
class Prepared:
    """A checked sample: its members and the bytes they take in a tar."""

    key: str
    origin: str
    members: tuple[Member, ...]
    nbytes: int


@dataclass
class Scan:
    """What reading the input found: the samples, those refused already, and what was ignored."""

    sources: list[Source] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    """Lines for the report: files or entries not taken as samples (not counted as skipped)."""


@dataclass(slots=True)
class ShardResult:
    """One written shard."""

    name: str
    count: int
    nbytes: int
    skipped: tuple[Skipped, ...]


class _BadSample(Exception):
    """Raised while checking a sample; becomes a :class:`Skipped`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------------
# Keys


def make_key(stem: str) -> str:
    """A WebDataset key from a path without its extension: ``/``-separated, no empty or ``.``
    components, every dot replaced by ``_`` (``a/./b.v2`` -> ``a/b_v2``)."""
    parts = [part for part in stem.replace("\\", "/").split("/") if part not in ("", ".")]
    return "/".join(parts).replace(".", "_")


def _split_extension(path: str) -> tuple[str, str]:
    """``a/b/0001.JPG`` -> (``a/b/0001``, ``jpg``); no extension -> (path, "")."""
    stem, ext = os.path.splitext(path)
    return stem, ext[1:].lower()


def check_unique_keys(sources: Sequence[Source]) -> None:
    """Raise UsageError naming both sources of the first key that appears twice."""
    first: dict[str, Source] = {}
    for source in sources:
        other = first.setdefault(source.key, source)
        if other is not source:
            raise UsageError(
                f"duplicate key {source.key!r}: {other.origin} and {source.origin} (a key is the "
                "stem with every dot replaced by '_'); rename one of them or give distinct keys"
            )


# ----------------------------------------------------------------------------------------------
# Input: a folder tree


def scan_folder(root: Path, exclude: Path | None = None) -> Scan:
    """Group the files under ``root`` by stem; ``exclude`` (the output directory) is not entered."""
    if not root.is_dir():
        raise UsageError(f"--from-folder {root}: not a directory; give the folder that holds the data")
    groups: dict[str, dict[str, str]] = {}
    ignored: collections.Counter[str] = collections.Counter()
    excluded = exclude.resolve() if exclude is not None else None
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if Path(directory, d).resolve() != excluded)
        inside = os.path.relpath(directory, root)
        prefix = "" if inside == "." else inside.replace(os.sep, "/") + "/"
        for name in sorted(files):
            relative = prefix + name
            stem, ext = _split_extension(relative)
            kind = _KINDS.get(ext)
            if kind is None:
                ignored["." + ext if ext else "(no extension)"] += 1
                continue
            files_of_stem = groups.setdefault(stem, {})
            if kind in files_of_stem:
                raise UsageError(
                    f"duplicate key {make_key(stem)!r}: {files_of_stem[kind]} and {relative} are both "
                    f"{kind} files of one sample; rename or remove one of them"
                )
            files_of_stem[kind] = relative
    scan = Scan()
    for stem in sorted(groups):
        scan_folder_sample(root, stem, groups[stem], scan)
    if ignored:
        kinds = " ".join(f"{ext} ({count})" for ext, count in sorted(ignored.items()))
        scan.ignored.append(f"{sum(ignored.values())} files with other extensions: {kinds}")
    return scan


def scan_folder_sample(root: Path, stem: str, files: dict[str, str], scan: Scan) -> None:
    """Add the sample made of ``files`` (kind -> path relative to root) to ``scan``."""
    origin = " + ".join(files[kind] for kind in ("image", "audio", "caption", "json") if kind in files)
    key = make_key(stem)
    if not key:
        scan.skipped.append(Skipped("empty key", origin))
    elif "image" not in files and "audio" not in files:
        scan.skipped.append(Skipped("missing image/audio file", origin))
    elif not {"caption", "json"} & set(files) and not {"image", "audio"} <= set(files):
        scan.skipped.append(Skipped("missing caption file", origin))
    else:
        full = {kind: os.path.join(root, path) for kind, path in files.items()}
        scan.sources.append(Source(
            key=key, origin=origin, image=full.get("image"), audio=full.get("audio"),
            caption_file=full.get("caption"), json_file=full.get("json"),
        ))


# ----------------------------------------------------------------------------------------------
# Input: a CSV or JSONL manifest


def _read_manifest_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, row) per sample row; row None for a malformed one. Raises UsageError when the
    file cannot be read at all."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise UsageError(f"--from-manifest {path}: expected a .csv or .jsonl file; rename or convert it")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            if suffix == ".jsonl":
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        yield number, _parse_json_line(line)
                return
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"image", "audio"} & set(reader.fieldnames):
                raise UsageError(
                    f"--from-manifest {path}: the header row {reader.fieldnames or []} has neither an "
                    "'image' nor an 'audio' column; the first row must name the columns"
                )
            for row in reader:
                yield reader.line_num, (None if None in row else dict(row))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UsageError(
            f"--from-manifest {path}: cannot read it ({err}); fix the path or the file (UTF-8 CSV or JSONL)"
        ) from None


def _parse_json_line(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def _text(value: Any, name: str) -> str | None:
    """A manifest string field: None if absent or empty; _BadSample if not a string."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _BadSample(f"malformed {name}", f"expected a string, got {type(value).__name__}")
    return value


def _text_list(value: Any, name: str) -> list[str]:
    """A manifest list field (a list, or a JSON list in a CSV cell); _BadSample if malformed."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _BadSample(f"malformed {name}", "expected a JSON list of strings") from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _BadSample(f"malformed {name}", "expected a list of strings")
    return value


def _manifest_path(value: str, root: Path) -> str:
    return str(root / value)  # an absolute value replaces root


def _manifest_key(row: dict[str, Any], root: Path) -> str:
    """The row's ``key``, else its image (else audio) path relative to root, without extension."""
    key = row.get("key")
    if key not in (None, ""):
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise _BadSample("malformed key", f"expected a string, got {type(key).__name__}")
        return make_key(str(key))
    path = _text(row.get("image"), "image") or _text(row.get("audio"), "audio") or ""
    stem, _ = _split_extension(path)
    base = os.path.abspath(root)
    full = os.path.normpath(os.path.join(base, stem))
    if full.startswith(base.rstrip(os.sep) + os.sep):
        return make_key(Path(full).relative_to(base).as_posix())
    return make_key(Path(stem).name)


def manifest_source(row: dict[str, Any], origin: str, root: Path) -> Source:
    """A manifest row as a Source; raises _BadSample for a row that cannot make a sample."""
    image = _text(row.get("image"), "image")
    audio = _text(row.get("audio"), "audio")
    if image is None and audio is None:
        raise _BadSample("no image or audio")
    for path, kind, known in ((image, "image", IMAGE_EXTENSIONS), (audio, "audio", AUDIO_EXTENSIONS)):
        if path is not None and _split_extension(path)[1] not in known:
            raise _BadSample(f"unsupported {kind} type", f"{path}; expected one of {', '.join(known)}")
    captions = [_text(row.get("caption"), "caption")] + _text_list(row.get("captions"), "captions")
    answers = [_text(row.get("answer"), "answer")] + _text_list(row.get("answers"), "answers")
    key = _manifest_key(row, root)
    if not key:
        raise _BadSample("empty key")
    return Source(
        key=key,
        origin=f"{origin} ({image or audio})",
        image=_manifest_path(image, root) if image else None,
        audio=_manifest_path(audio, root) if audio else None,
        captions=tuple(c for c in captions if c is not None),
        question=_text(row.get("question"), "question"),
        answers=tuple(a for a in answers if a is not None),
    )


def scan_manifest(path: Path, root: Path | None) -> Scan:
    """Read every row of a CSV or JSONL manifest."""
    root = root if root is not None else path.parent
    if not root.is_dir():
        raise UsageError(f"--root {root}: not a directory; give the folder the manifest's paths are relative to")
    scan = Scan()
    for number, row in _read_manifest_rows(path):
        origin = f"{path.name} line {number}"
        if row is None:
            scan.skipped.append(Skipped("malformed manifest row", origin))
            continue
        try:
            scan.sources.append(manifest_source(row, origin, root))
        except _BadSample as bad:
            scan.skipped.append(Skipped(bad.reason, origin, bad.detail))
    return scan


# ----------------------------------------------------------------------------------------------
# Input: COCO captions


def _load_coco(path: Path) -> tuple[list[Any], list[Any]]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"--from-coco {path}: cannot read it ({err}); fix the path or the file") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise UsageError(
            f"--from-coco {path}: not a COCO captions file (expected 'images' and 'annotations' lists); "
            "give a captions_*.json file"
        )
    return data["images"], data["annotations"]


def scan_coco(path: Path, images_dir: Path) -> Scan:
    """One sample per COCO image, with all of its captions."""
    if not images_dir.is_dir():
        raise UsageError(f"--images {images_dir}: not a directory; give the folder that holds the COCO images")
    images, annotations = _load_coco(path)
    captions: dict[Any, list[str]] = collections.defaultdict(list)
    known_ids = {entry.get("id") for entry in images if isinstance(entry, dict)}
    unknown = malformed = 0
    for note in annotations:
        if not isinstance(note, dict) or not isinstance(note.get("caption"), str):
            malformed += 1
        elif note.get("image_id") not in known_ids:
            unknown += 1
        else:
            captions[note["image_id"]].append(note["caption"])
    scan = Scan()
    for index, entry in enumerate(images):
        name = entry.get("file_name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            scan.skipped.append(Skipped("malformed COCO image entry", f"{path.name} images[{index}]"))
            continue
        origin = f"{path.name} image id {entry.get('id')} ({name})"
        key = make_key(_split_extension(name)[0])
        if _split_extension(name)[1] not in IMAGE_EXTENSIONS:
            scan.skipped.append(Skipped("unsupported image type", origin))
        elif not key:
            scan.skipped.append(Skipped("empty key", origin))
        else:
            scan.sources.append(Source(key=key, origin=origin, image=str(images_dir / name),
                                       captions=tuple(captions.get(entry.get("id"), ()))))
    notes = [f"{unknown} annotations of unknown image ids" if unknown else "",
             f"{malformed} malformed annotations" if malformed else ""]
    if unknown or malformed:
        scan.ignored.append(", ".join(note for note in notes if note))
    return scan


# ----------------------------------------------------------------------------------------------
# Checking a sample: read its small files, check its media headers, size its members


def _member_header(name: str, size: int) -> bytes:
    """The tar header block(s) of a regular file, with fixed metadata (pax only where needed)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _member_bytes(member: Member) -> int:
    """Bytes the member takes in a tar: its header (one block, unless the name needs a pax
    header) and its data padded to whole blocks."""
    plain = member.name.isascii() and len(member.name) <= _USTAR_NAME and member.size < _USTAR_SIZE
    header = _BLOCK if plain else len(_member_header(member.name, member.size))
    return header + _padded(member.size)


def _file_size(path: str, kind: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise _BadSample(f"missing {kind} file", path) from None
    except OSError as err:
        raise _BadSample("unreadable file", f"{path}: {err.strerror}") from None


def _read_small(path: str, kind: str) -> bytes:
    _file_size(path, kind)
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as err:
        raise _BadSample("unreadable file", f"{path}: {err.strerror}") from None


def _check_image(path: str) -> None:
    from PIL import Image, UnidentifiedImageError  # imported on first use: the tool starts faster

    try:
        with open(path, "rb") as handle, Image.open(handle) as image:
            width, height = image.size
    except UnidentifiedImageError:
        raise _BadSample("undecodable image", f"{path}: not an image PIL recognises") from None
    except OSError as err:
        if err.strerror is None:  # PIL's own errors (truncated headers, ...)
            raise _BadSample("undecodable image", f"{path}: {err}") from None
        raise _BadSample("unreadable file", f"{path}: {err.strerror}") from None
    except Exception as err:  # PIL raises many types on malformed input
        raise _BadSample("undecodable image", f"{path}: {type(err).__name__}") from None
    if width < 1 or height < 1:
        raise _BadSample("undecodable image", f"{path}: {width}x{height}")


def _check_audio(path: str) -> None:
    import soundfile  # imported on first use

    try:
        with open(path, "rb") as handle:
            soundfile.info(handle)
    except OSError as err:
        raise _BadSample("unreadable file", f"{path}: {err.strerror}") from None
    except Exception as err:  # soundfile.LibsndfileError and friends
        raise _BadSample("undecodable audio", f"{path}: {err}") from None


def _decode_caption(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _BadSample("caption is not UTF-8", path) from None


def _texts(source: Source) -> tuple[list[str], str | None, list[str], bytes | None]:
    """Captions, question, answers (stripped, empties dropped) and the carried json of a sample."""
    captions = list(source.captions)
    if source.caption_file is not None:
        captions.append(_decode_caption(_read_small(source.caption_file, "caption"), source.caption_file))
    carried = None
    if source.json_file is not None:
        carried = _read_small(source.json_file, "json")
        try:
            loaded = json.loads(carried.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _BadSample("malformed json file", f"{source.json_file}: {err}") from None
        if not isinstance(loaded, dict):
            raise _BadSample("malformed json file", f"{source.json_file}: not a JSON object")
    kept = [c.strip() for c in captions if c.strip()]
    question = source.question.strip() if source.question and source.question.strip() else None
    answers = [a.strip() for a in source.answers if a.strip()]
    if question is not None and not answers:
        raise _BadSample("question without answers")
    if question is None and answers:
        raise _BadSample("answers without a question")
    if not kept and question is None and carried is None:
        if captions:
            raise _BadSample("empty caption")
        if not (source.image and source.audio):
            raise _BadSample("no caption or question")
    return kept, question, answers, carried


def _text_member(key: str, captions: list[str], question: str | None, answers: list[str]) -> Member | None:
    """``<key>.txt`` for one caption alone, else ``<key>.json`` with the fields the sample has."""
    if len(captions) == 1 and question is None:
        data = captions[0].encode("utf-8")
        return Member(f"{key}.txt", len(data), data=data)
    fields: dict[str, Any] = {}
    if captions:
        fields["captions"] = captions
    if question is not None:
        fields["question"] = question
        fields["answers"] = answers
    if not fields:
        return None
    data = json.dumps(fields, ensure_ascii=False).encode("utf-8")
    return Member(f"{key}.json", len(data), data=data)


def prepare(source: Source) -> Prepared | Skipped:
    """Check a sample (its files exist, its media headers parse, it has text) and size it."""
    try:
        members: list[Member] = []
        for path, kind, check in ((source.image, "image", _check_image), (source.audio, "audio", _check_audio)):
            if path is not None:
                size = _file_size(path, kind)
                check(path)
                members.append(Member(f"{source.key}.{_split_extension(path)[1]}", size, path=path))
        captions, question, answers, carried = _texts(source)
        text = _text_member(source.key, captions, question, answers)
        if text is not None:
            members.append(text)
        if carried is not None:
            if text is not None and text.name.endswith(".json"):
                raise _BadSample("json file and questions or several captions")
            members.append(Member(f"{source.key}.json", len(carried), data=carried))
    except _BadSample as bad:
        return Skipped(bad.reason, source.origin, bad.detail)
    return Prepared(source.key, source.origin, tuple(members), sum(_member_bytes(m) for m in members))


def _prepare_batch(sources: list[Source]) -> list[Prepared | Skipped]:
    return [prepare(source) for source in sources]


# ----------------------------------------------------------------------------------------------
# Packing and writing


def pack(samples: Iterable[Prepared], max_samples: int, max_bytes: int | None) -> list[list[Prepared]]:
    """Consecutive samples into shards of at most ``max_samples`` (0: any number) and at most
    ``max_bytes`` bytes as a tar file; a sample too large for any shard goes alone."""
    shards: list[list[Prepared]] = []
    current: list[Prepared] = []
    current_bytes = len(_END_OF_ARCHIVE)
    for sample in samples:
        full = max_samples and len(current) >= max_samples
        too_big = max_bytes is not None and current_bytes + sample.nbytes > max_bytes
        if current and (full or too_big):
            shards.append(current)
            current, current_bytes = [], len(_END_OF_ARCHIVE)
        current.append(sample)
        current_bytes += sample.nbytes
    if current:
        shards.append(current)
    return shards


def _read_member(member: Member) -> bytes:
    if member.data is not None:
        return member.data
    assert member.path is not None
    with open(member.path, "rb") as handle:
        data = handle.read()
    if len(data) != member.size:
        raise _BadSample("file changed during the run", f"{member.path}: {member.size} -> {len(data)} bytes")
    return data


def _write_sample(handle: BinaryIO, members: Sequence[Member], contents: Sequence[bytes]) -> int:
    written = 0
    for member, data in zip(members, contents):
        header = _member_header(member.name, member.size)
        padding = b"\0" * (_padded(member.size) - member.size)
        for chunk in (header, data, padding):
            handle.write(chunk)
            written += len(chunk)
    return written


def write_shard(path: Path, samples: Sequence[Prepared]) -> ShardResult:
    """Write ``samples`` as a tar to ``path`` atomically; a sample whose file cannot be read
    (anymore) is left out and reported."""
    skipped: list[Skipped] = []
    count = 0
    with atomic_output(path) as handle:
        nbytes = 0
        for sample in samples:
            try:
                contents = [_read_member(member) for member in sample.members]
            except OSError as err:
                skipped.append(Skipped("unreadable file", sample.origin, str(err.strerror)))
                continue
            except _BadSample as bad:
                skipped.append(Skipped(bad.reason, sample.origin, bad.detail))
                continue
            nbytes += _write_sample(handle, sample.members, contents)
            count += 1
        handle.write(_END_OF_ARCHIVE)
        nbytes += len(_END_OF_ARCHIVE)
    return ShardResult(path.name, count, nbytes, tuple(skipped))


def _write_job(job: tuple[str, list[Prepared]]) -> ShardResult:
    path, samples = job
    return write_shard(Path(path), samples)


# ----------------------------------------------------------------------------------------------
# Running in parallel


class _Runner:
    """Ordered map over a process pool (fork) or, with one worker, in this process."""

    def __init__(self, workers: int) -> None:
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("fork")
            self.pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context)

    def imap(self, function: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
        """``function`` of each item, in order (computed in parallel with a pool)."""
        if self.pool is None:
            return map(function, items)
        return self.pool.map(function, items)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _progress(total: int, desc: str, quiet: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, disable=quiet,
                dynamic_ncols=True, smoothing=0.1)


def prepare_all(runner: _Runner, sources: Sequence[Source], quiet: bool) -> list[Prepared | Skipped]:
    """:func:`prepare` every source, in order."""
    batches = [list(sources[i:i + _PREPARE_BATCH]) for i in range(0, len(sources), _PREPARE_BATCH)]
    results: list[Prepared | Skipped] = []
    with _progress(len(sources), "checking", quiet) as bar:
        for batch in runner.imap(_prepare_batch, batches):
            results.extend(batch)
            bar.update(len(batch))
    return results


def write_all(runner: _Runner, out: Path, prefix: str, shards: Sequence[list[Prepared]],
              quiet: bool) -> list[ShardResult]:
    """Write every shard (``<prefix>-<index:06d>.tar``), in parallel; results in shard order."""
    jobs = [(str(out / shard_name(prefix, index)), samples) for index, samples in enumerate(shards)]
    results: list[ShardResult] = []
    with _progress(sum(len(s) for s in shards), "writing", quiet) as bar:
        for result in runner.imap(_write_job, jobs):
            results.append(result)
            bar.update(result.count + len(result.skipped))
    return results


# ----------------------------------------------------------------------------------------------
# The output directory


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse a directory that holds shards or a sizes.json, unless ``force``."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory; choose another path")
    if force or not out.is_dir():
        return
    found = sorted(p.name for p in out.iterdir() if p.name == SIZES_FILE or p.suffix == ".tar")
    if found:
        raise UsageError(
            f"--out {out} already holds {_some(found)}; choose an empty directory, or give --force to replace them"
        )


def remove_stale_shards(out: Path, prefix: str, written: set[str]) -> list[str]:
    """Delete ``<prefix>-NNNNNN.tar`` files in ``out`` that this run did not write."""
    pattern = re.compile(re.escape(prefix) + r"-\d{6}\.tar")
    stale = sorted(p.name for p in out.iterdir() if pattern.fullmatch(p.name) and p.name not in written)
    for name in stale:
        (out / name).unlink()
    return stale


def write_sizes(out: Path, results: Sequence[ShardResult]) -> None:
    with atomic_output(out / SIZES_FILE) as handle:
        sizes = {result.name: result.count for result in results}
        handle.write((json.dumps(sizes, indent=2) + "\n").encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# The whole run


@dataclass
class Report:
    """What a run did, for the summary line."""

    out: Path
    shards: list[ShardResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    """Other .tar files left in the output directory (with --force), which sizes.json does not list."""

    @property
    def samples(self) -> int:
        return sum(shard.count for shard in self.shards)

    @property
    def nbytes(self) -> int:
        return sum(shard.nbytes for shard in self.shards)

    def skipped_text(self) -> str:
        """``skipped N samples (a reason, b other reason)``, the most frequent reason first."""
        reasons = collections.Counter(s.reason for s in self.skipped)
        ranked = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))
        details = ", ".join(f"{count} {reason}" for reason, count in ranked)
        return f"skipped {_count(len(self.skipped), 'sample')}" + (f" ({details})" if details else "")

    def summary(self) -> str:
        """One line: shards, samples, bytes, skipped samples by reason."""
        return (f"wrote {_count(len(self.shards), 'shard')}, {_count(self.samples, 'sample')}, {self.nbytes} bytes "
                f"({human_size(self.nbytes)}) to {self.out}; {self.skipped_text()}")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def human_size(nbytes: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{nbytes} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def scan_input(args: argparse.Namespace) -> Scan:
    """The samples of whichever input the arguments name."""
    if args.from_folder is not None:
        if Path(args.from_folder).resolve() == Path(args.out).resolve():
            raise UsageError(f"--out {args.out} is the input folder; write the shards to another directory")
        return scan_folder(Path(args.from_folder), exclude=Path(args.out))
    if args.from_manifest is not None:
        return scan_manifest(Path(args.from_manifest), Path(args.root) if args.root else None)
    return scan_coco(Path(args.from_coco), Path(args.images))


def order_sources(sources: list[Source], shuffle: bool, seed: int) -> list[Source]:
    """Sorted by key; with ``shuffle``, then shuffled by ``seed``."""
    ordered = sorted(sources, key=lambda s: s.key)
    if shuffle:
        random.Random(seed).shuffle(ordered)
    return ordered


def _warn(skipped: Sequence[Skipped]) -> None:
    for item in skipped[:_MAX_WARNINGS]:
        print(f"warning: {item.message()}", file=sys.stderr)
    if len(skipped) > _MAX_WARNINGS:
        print(f"warning: ... and {len(skipped) - _MAX_WARNINGS} more skipped samples", file=sys.stderr)


def make_shards(args: argparse.Namespace) -> Report:
    """Scan the input, check every sample, pack and write the shards and sizes.json."""
    out = Path(args.out)
    check_output_dir(out, args.force)
    scan = scan_input(args)
    check_unique_keys(scan.sources)
    sources = order_sources(scan.sources, args.shuffle, args.seed)
    report = Report(out=out, skipped=list(scan.skipped), ignored=scan.ignored)
    runner = _Runner(args.workers)
    try:
        checked = prepare_all(runner, sources, args.quiet)
        report.skipped += [item for item in checked if isinstance(item, Skipped)]
        prepared = [item for item in checked if isinstance(item, Prepared)]
        if prepared:
            out.mkdir(parents=True, exist_ok=True)
            shards = pack(prepared, args.max_samples, args.max_bytes)
            report.shards = write_all(runner, out, args.prefix, shards, args.quiet)
    finally:
        runner.close()
    report.skipped += [item for shard in report.shards for item in shard.skipped]
    if report.shards:
        write_sizes(out, report.shards)
        if args.force:
            written = {s.name for s in report.shards}
            report.removed = remove_stale_shards(out, args.prefix, written)
            report.unlisted = sorted(p.name for p in out.glob("*.tar") if p.name not in written)
        fsync_path(out)
    return report


# ----------------------------------------------------------------------------------------------
# Command line


def parse_size(text: str) -> int:
    """``1G`` -> 1073741824; units K, M, G, T are powers of 1024 (``500M``, ``1.5G``, ``64KiB``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 1G, 500M, 64K or 1000000")
    value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be at least one byte")
    return value


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="The sample layout and the input formats are described in the module docstring of tools/make_shards.py.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-folder", metavar="DIR", help="a folder tree; files grouped by stem")
    source.add_argument("--from-manifest", metavar="FILE", help="a .csv (with a header row) or .jsonl manifest")
    source.add_argument("--from-coco", metavar="CAPTIONS_JSON", help="a COCO captions file (needs --images)")
    parser.add_argument("--images", metavar="DIR", help="with --from-coco: the folder of the images")
    parser.add_argument("--root", metavar="DIR",
                        help="with --from-manifest: folder that relative paths start from (default: the manifest's)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory for the shards and sizes.json")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    parser.add_argument("--max-samples", type=int, default=1000, metavar="N",
                        help="samples per shard at most (default 1000; 0: no limit, with --max-bytes)")
    parser.add_argument("--max-bytes", type=parse_size, default=None, metavar="SIZE",
                        help="bytes per shard file at most, e.g. 1G or 500M (a larger sample goes alone)")
    parser.add_argument("--workers", type=int, default=_default_workers(), metavar="N",
                        help="parallel processes (default: min(4, CPUs)); the output does not depend on it")
    parser.add_argument("--shuffle", action="store_true", help="shuffle the samples (with --seed) instead of sorting")
    parser.add_argument("--seed", type=int, default=0, help="the shuffle's seed (default 0)")
    parser.add_argument("--force", action="store_true",
                        help="write into a directory that holds shards or sizes.json, replacing them")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any sample was skipped")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed and cross-checked arguments; exits with status 2 on a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_coco is not None and args.images is None:
        parser.error("--from-coco needs --images DIR, the folder of the images")
    if args.images is not None and args.from_coco is None:
        parser.error("--images goes with --from-coco only")
    if args.root is not None and args.from_manifest is None:
        parser.error("--root goes with --from-manifest only")
    if args.max_samples < 0 or (args.max_samples == 0 and args.max_bytes is None):
        parser.error("--max-samples must be positive (or 0 with --max-bytes)")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not args.prefix or "/" in args.prefix or os.sep in args.prefix:
        parser.error(f"--prefix {args.prefix!r}: give a file name prefix without '/'")
    return args


def _some(names: Sequence[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status."""
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    tqdm.monitor_interval = 0  # no monitor thread to be copied into forked workers
    try:
        report = make_shards(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _warn(report.skipped)
    for line in report.ignored:
        print(f"ignored: {line}")
    if report.removed:
        print(f"removed {len(report.removed)} shards of an earlier run: {_some(report.removed)}")
    if report.unlisted:
        print(f"warning: {report.out} also holds {_some(report.unlisted)}, which {SIZES_FILE} does not list; "
              "a loader given the whole directory reads them too", file=sys.stderr)
    if not report.shards:
        found = report.skipped_text() if report.skipped else "the input holds no samples"
        print(f"error: no usable samples, nothing written to {report.out}; {found}", file=sys.stderr)
        return 1
    print(report.summary())
    return 1 if args.strict and report.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
