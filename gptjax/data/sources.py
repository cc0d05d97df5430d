"""Sources: what ``data.source`` names, turned into an identity (for the store's key) and documents.

Every kind yields its documents in a fixed order, so a build can be resumed by skipping the
first n documents and two builds of one source write the same bytes. Errors name the file
(or dataset) and say what to do.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptjax import jsonl
from gptjax.config import DataConfig
from gptjax.errors import GptjaxError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
COMPRESSED = (".gz", ".zst")
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_KINDS = "stdlib, a text/JSONL/Parquet file, directory or glob, tfds:NAME, hf-disk:PATH, hf:NAME[:SUBSET]"


@dataclass
class Source:
    """One source, resolved.

    Attributes:
        kind: ``stdlib``, ``text``, ``parquet``, ``tfds``, ``hf-disk``, ``hf`` or ``tokens``.
        name: A short name for the store's folder.
        identity: What the store's key hashes: paths with sizes and mtimes, or a dataset's
            name, version and splits.
        files: The files read, in order (text, Parquet and token sources).
        text_bytes: The text's size if known before reading (for the progress bar's ETA).
        extra: Source facts recorded in the store's ``meta.json``.
    """

    kind: str
    name: str
    identity: Any
    files: list[Path] = field(default_factory=list)
    text_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def source_kind(source: str) -> str:
    if source == "stdlib":
        return "stdlib"
    for prefix in ("tfds", "hf-disk", "hf"):
        if source.startswith(prefix + ":"):
            return prefix
    if source.endswith((".bin", ".npy")):
        return "tokens"
    return "parquet" if _base(source).endswith(".parquet") or _holds_parquet(source) else "text"


def _base(name: str) -> str:
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    return name


def _holds_parquet(source: str) -> bool:
    path = Path(source).expanduser()
    return path.is_dir() and next(path.rglob("*.parquet"), None) is not None


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _STDLIB_SKIP)
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files)


def _matching_files(source: str, suffixes: tuple[str, ...]) -> list[Path]:
    path = Path(source).expanduser()
    if any(c in source for c in "*?["):
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    elif path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
    elif path.is_file():
        return [path.resolve()]
    else:
        raise GptjaxError(f"data source {source!r} does not exist: give {_KINDS}, or a .bin/.npy token file")
    files = sorted(p.resolve() for p in files if _base(p.name).endswith(suffixes))
    if not files:
        kinds = "/".join(suffixes)
        raise GptjaxError(f"no {kinds} files (or .gz/.zst of them) match {source!r}")
    return files


def file_identity(files: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(p), (s := p.stat()).st_size, s.st_mtime_ns) for p in files]


def resolve(cfg: DataConfig) -> Source:
    """The source ``cfg.source`` names, checked to exist (nothing is read yet)."""
    kind = source_kind(cfg.source)
    if kind in ("stdlib", "text", "parquet"):
        if kind == "stdlib":
            files = stdlib_files()
        else:
            files = _matching_files(cfg.source, (".parquet",) if kind == "parquet" else TEXT_SUFFIXES)
        name = "stdlib" if kind == "stdlib" else files[0].stem if len(files) == 1 else kind
        plain = [p for p in files if not p.name.endswith(COMPRESSED)]
        text_bytes = _parquet_text_bytes(files, cfg.text_field) if kind == "parquet" else None
        if kind != "parquet" and len(plain) == len(files):
            text_bytes = sum(p.stat().st_size for p in files)
        return Source(kind, name, file_identity(files), files, text_bytes)
    if kind == "tokens":
        path = Path(cfg.source).expanduser()
        if not path.is_file():
            raise GptjaxError(
                f"token file {cfg.source!r} does not exist: give the path of a .bin or .npy file"
            )
        files = token_files(path.resolve())
        return Source(kind, path.stem, file_identity(files), files)
    if kind == "hf-disk":
        path = Path(cfg.source.removeprefix("hf-disk:")).expanduser().resolve()
        if not path.is_dir():
            raise GptjaxError(
                f"{cfg.source!r}: no folder {str(path)!r}; give the folder datasets' save_to_disk wrote"
            )
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return Source(kind, path.name, file_identity(files), [], None)
    if kind == "hf":
        name, _, subset = cfg.source.removeprefix("hf:").partition(":")
        return Source(kind, name.rsplit("/", 1)[-1], [name, subset, cfg.train_split, cfg.val_split])
    data_dir = os.path.abspath(os.path.expanduser(cfg.tfds_data_dir)) if cfg.tfds_data_dir else ""
    return Source(kind, cfg.source.removeprefix("tfds:"), [cfg.source, data_dir])


def token_files(path: Path) -> list[Path]:
    sibling = path.with_name("val" + path.suffix)  # nanoGPT writes train.bin and val.bin.
    return [path, sibling] if path.stem == "train" and sibling.is_file() else [path]


def documents(source: Source, cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """``(stream, text)`` pairs in a fixed order; stream is ``train`` or the source's own ``val``.

    The source's validation split (TFDS, Hugging Face) comes after its training split;
    ``source.extra['own_val']`` says whether it exists (set before the first document).
    """
    if source.kind in ("stdlib", "text"):
        for path in source.files:
            yield from (("train", t) for t in _guarded(path, _text_documents(path, cfg.text_field)))
    elif source.kind == "parquet":
        for path in source.files:
            yield from (("train", t) for t in _guarded(path, _parquet_documents(path, cfg.text_field)))
    elif source.kind == "tfds":
        yield from _tfds_documents(source, cfg)
    else:
        yield from _hf_documents(source, cfg)


def _guarded(path: Path, texts: Iterator[str]) -> Iterator[str]:
    """Text must be UTF-8: a file that is not, or cannot be read, stops the build naming it.

    Training on replacement characters would be silently wrong, and skipping files would
    change the corpus without saying so.
    """
    try:
        yield from texts
    except UnicodeDecodeError as e:
        byte = e.object[e.start : e.start + 1].hex()
        raise GptjaxError(
            f"{str(path)!r} is not UTF-8 text (byte 0x{byte}: {e.reason}): convert it to UTF-8 "
            "(iconv -t utf-8) or remove it from data.source"
        ) from e
    except (OSError, EOFError, *_zstd_errors()) as e:  # gzip.BadGzipFile is an OSError
        raise GptjaxError(
            f"cannot read {str(path)!r} ({type(e).__name__}: {e}): fix or remove the file"
        ) from e


def _zstd_errors() -> tuple[type[Exception], ...]:
    try:
        import zstandard
    except ImportError:
        return ()
    return (zstandard.ZstdError,)


def _text_documents(path: Path, text_field: str) -> Iterator[str]:
    """A file's text, or each JSONL line's ``text_field``."""
    try:
        f = jsonl.open_text(path)
    except ImportError:
        raise GptjaxError(f"{str(path)!r} is zstd-compressed: pip install 'gptjax[data]'") from None
    with f:
        if not _base(path.name).endswith(".jsonl"):
            text = f.read()
            if "\x00" in text:
                raise GptjaxError(
                    f"{str(path)!r} holds NUL bytes, so it is binary, not text: remove it from "
                    "data.source (token ids belong in a .bin or .npy token file)"
                )
            yield text
            return
        for line_number, record in jsonl.parse(f, repr(str(path))):
            yield _record_text(record, text_field, f"line {line_number} of {str(path)!r}")


def _record_text(record: dict, text_field: str, where: str) -> str:
    if text_field not in record:
        raise GptjaxError(
            f"{where} has no {text_field!r} key: set data.text_field to one of {sorted(record)}"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise GptjaxError(
            f"{where}: {text_field!r} is a {type(text).__name__}, not a string: "
            "set data.text_field to the key holding the text"
        )
    return text


def _parquet_file(path: Path, text_field: str) -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise GptjaxError(f"{str(path)!r} is Parquet: pip install 'gptjax[data]' (pyarrow)") from None
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise GptjaxError(f"{str(path)!r} is not a readable Parquet file ({e}): fix or remove it") from e
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise GptjaxError(
            f"Parquet file {str(path)!r} has no column {text_field!r}: set data.text_field to one of "
            f"{schema.names}"
        )
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise GptjaxError(
            f"column {text_field!r} of {str(path)!r} holds {column_type}, not strings: "
            "set data.text_field to the text column"
        )
    return parquet


def _parquet_text_bytes(files: list[Path], text_field: str) -> int:
    """The text column's uncompressed size from the files' footers (close to its UTF-8 bytes)."""
    total = 0
    for path in files:
        metadata = _parquet_file(path, text_field).metadata
        index = metadata.schema.to_arrow_schema().get_field_index(text_field)
        for group in range(metadata.num_row_groups):
            total += metadata.row_group(group).column(index).total_uncompressed_size
    return total


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    """The text column, one record batch at a time (a file is never read whole)."""
    parquet = _parquet_file(path, text_field)
    for batch in parquet.iter_batches(batch_size=256, columns=[text_field]):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _import_tfds() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter.
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError:
        raise GptjaxError("tfds: sources need TensorFlow Datasets: pip install 'gptjax[tfds]'") from None
    # TFDS 4.9.10 imports importlib_resources (a Python < 3.9 backport it does not install)
    # when it prepares a dataset; the standard library's importlib.resources is the same API.
    try:
        import importlib_resources  # noqa: F401
    except ImportError:
        import importlib.resources
        import importlib.resources.abc

        sys.modules["importlib_resources"] = importlib.resources
    with contextlib.suppress(RuntimeError):  # Raised once TensorFlow's devices are initialized.
        tf.config.set_visible_devices([], "GPU")  # tf.data reads text; the accelerators are JAX's.
    return tfds


def _tfds_documents(source: Source, cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """Prepares the TFDS builder (offline through manual_dir) and reads its splits."""
    tfds = _import_tfds()
    name = source.name
    try:
        builder = tfds.builder(name, data_dir=cfg.tfds_data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        raise GptjaxError(f"unknown TFDS dataset {name!r}: check the name in the TFDS catalog") from None
    features = list(builder.info.features.keys())
    if cfg.text_field not in features:
        raise GptjaxError(
            f"TFDS dataset {name!r} has no feature {cfg.text_field!r}: "
            f"set data.text_field to one of {features}"
        )
    download_config = tfds.download.DownloadConfig(manual_dir=cfg.tfds_manual_dir or None)
    # TFDS retries a failed download 10 times with exponential backoff: offline, 214 s
    # before its error. Three retries still ride out a transient failure, in about a second.
    from tensorflow_datasets.core.download import downloader

    downloader.MAX_RETRIES = min(downloader.MAX_RETRIES, 3)
    try:
        builder.download_and_prepare(download_config=download_config)
    except Exception as e:  # Network, checksum and manual-download errors come in many types.
        raise GptjaxError(
            f"TFDS could not prepare {name!r} ({_reason(e)}); offline, put its source files in "
            "data.tfds_manual_dir"
        ) from e
    splits = list(builder.info.splits.keys())
    _check_split(f"TFDS dataset {name!r}", cfg.train_split, splits)
    own_val = bool(cfg.val_split) and cfg.val_split in splits
    source.extra.update(version=str(builder.info.version), splits=splits, own_val=own_val)
    for stream, split in (("train", cfg.train_split), ("val", cfg.val_split if own_val else None)):
        if split:
            dataset = builder.as_dataset(split=split, shuffle_files=False).map(lambda ex: ex[cfg.text_field])
            for texts in tfds.as_numpy(dataset.batch(1024)):
                yield from ((stream, t.decode("utf-8", errors="replace")) for t in texts)


def _reason(e: Exception) -> str:
    """An exception's type and first line, short enough for a one-line error."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"


def _check_split(what: str, split: str, splits: list[str]) -> None:
    if split not in splits:
        raise GptjaxError(f"{what} has no split {split!r}: set data.train_split to one of {splits}")


def _hf_documents(source: Source, cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """A dataset saved with ``save_to_disk`` (``hf-disk:``) or streamed from the Hub (``hf:``)."""
    try:
        import datasets
    except ImportError:
        raise GptjaxError(f"{cfg.source!r} needs Hugging Face datasets: pip install datasets") from None
    if source.kind == "hf-disk":
        path = cfg.source.removeprefix("hf-disk:")
        try:
            loaded = datasets.load_from_disk(os.path.expanduser(path))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise GptjaxError(
                f"{cfg.source!r} is not a dataset saved with save_to_disk ({type(e).__name__}: "
                f"{str(e)[:160]}): give the folder save_to_disk wrote"
            ) from e
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {cfg.train_split: loaded}
    else:
        name, _, subset = cfg.source.removeprefix("hf:").partition(":")
        try:
            loaded = datasets.load_dataset(name, subset or None, streaming=True)
        except Exception as e:  # Hub, network and missing-config errors come in many types.
            raise GptjaxError(
                f"cannot stream {cfg.source!r} from the Hugging Face Hub ({_reason(e)}); "
                "offline, save it with save_to_disk and use hf-disk:PATH"
            ) from e
        splits = dict(loaded)
    what = f"dataset {cfg.source!r}"
    _check_split(what, cfg.train_split, list(splits))
    columns = list(splits[cfg.train_split].column_names or [])
    if columns and cfg.text_field not in columns:
        raise GptjaxError(f"{what} has no column {cfg.text_field!r}: set data.text_field to one of {columns}")
    own_val = bool(cfg.val_split) and cfg.val_split in splits
    source.extra.update(splits=list(splits), own_val=own_val)
    for stream, split in (("train", cfg.train_split), ("val", cfg.val_split if own_val else None)):
        if split:
            for batch in splits[split].select_columns([cfg.text_field]).iter(batch_size=1024):
                yield from ((stream, t) for t in batch[cfg.text_field] if t is not None)
