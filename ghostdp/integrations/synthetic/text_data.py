"""Load a labelled text dataset (the "private" data of DP synthesis, or held-out real data).

Sources: a local CSV, TSV, JSONL or Parquet file, or a Hugging Face hub dataset name read with
``datasets.load_dataset``. Every source ends up as one :class:`LabelledTexts`: a text and a label name
per row, plus the ordered tuple of all label names. Labels are names (``"positive"``), never ints, because
they are pasted into the prompt prefix of the synthesis model (see ``prompts.py``).

Validation is strict on purpose: an empty text or an unknown label is an error that names the file, the
row and the fix, rather than a row that is silently dropped. A silently dropped row would change the
dataset size N that the privacy accountant is told about, and the sampling rate q = B / N with it.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

FileFormat = Literal["auto", "csv", "tsv", "jsonl", "parquet", "hub"]

_SUFFIX_FORMATS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}

#: SST-2 (GLUE) encodes the label as 0 / 1.
SST2_LABEL_NAMES: Mapping[int, str] = {0: "negative", 1: "positive"}
SST2_SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with one label name each.

    ``label_names`` is the ordered set of every label the dataset can have (from the label mapping when
    one was given, so a subsample that happens to miss a class still knows it exists); classifiers use
    its order for their output units and reports use it for their rows.
    """

    texts: tuple[str, ...]
    labels: tuple[str, ...]
    label_names: tuple[str, ...]
    source: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        # Accept lists for convenience but store tuples: a frozen dataclass holding a list is not frozen.
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "label_names", tuple(self.label_names))
        if len(self.texts) != len(self.labels):
            raise ValueError(
                f"LabelledTexts from {self.source}: {len(self.texts)} texts but {len(self.labels)} labels; "
                "every text needs exactly one label."
            )
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"LabelledTexts from {self.source}: label_names has duplicates: {self.label_names}")
        unknown = sorted(set(self.labels) - set(self.label_names))
        if unknown:
            raise ValueError(
                f"LabelledTexts from {self.source}: labels {unknown} are not in label_names "
                f"{self.label_names}; add them to label_names."
            )

    def __len__(self) -> int:
        return len(self.texts)

    def examples(self) -> list[dict[str, str]]:
        """Rows as ``{"text": ..., "label": ...}`` dicts, the input of :class:`PrefixLMCollator`."""
        return [{"text": t, "label": y} for t, y in zip(self.texts, self.labels)]

    def label_counts(self) -> dict[str, int]:
        """Number of rows per label name, in ``label_names`` order (zero counts included)."""
        counts = {name: 0 for name in self.label_names}
        for y in self.labels:
            counts[y] += 1
        return counts

    def subset(self, indices: Sequence[int]) -> LabelledTexts:
        """The rows at ``indices`` (same label_names)."""
        return LabelledTexts(
            texts=tuple(self.texts[i] for i in indices),
            labels=tuple(self.labels[i] for i in indices),
            label_names=self.label_names,
            source=self.source,
        )


@dataclass(frozen=True)
class TextDataConfig:
    """Where a labelled text dataset lives and how to read it.

    Args:
        source: a path to a .csv / .tsv / .jsonl / .parquet file, or a Hugging Face hub dataset name
            (``file_format="hub"``, or ``"auto"`` when no such local path exists).
        text_column: the column holding the text.
        label_column: the column holding the label (int or string).
        label_names: optional mapping from raw label values to names, e.g. ``{0: "negative",
            1: "positive"}``. Raw values are matched by their string form, so ``"1"`` read from a CSV
            matches the key ``1``. A value that already is one of the names is kept. Without a mapping,
            the names are the raw values as strings, sorted.
        split: the split to read from a hub dataset (ignored for files).
        limit: keep only the first ``limit`` rows of the source (applied first).
        sample: then keep a uniformly random subset of ``sample`` rows (original order kept), drawn with
            ``numpy.random.default_rng(seed)``, so the same seed gives the same rows.
        seed: seed for ``sample``.
        file_format: ``"auto"`` picks from the file suffix.
        hub_config: the configuration name passed to ``datasets.load_dataset`` (e.g. ``"sst2"`` for
            ``"glue"``).
    """

    source: str | Path
    text_column: str = "text"
    label_column: str = "label"
    label_names: Mapping[Any, str] | None = None
    split: str = "train"
    limit: int | None = None
    sample: int | None = None
    seed: int = 0
    file_format: FileFormat = "auto"
    hub_config: str | None = None

    def __post_init__(self) -> None:
        if self.file_format not in ("auto", "csv", "tsv", "jsonl", "parquet", "hub"):
            raise ValueError(
                f"TextDataConfig.file_format={self.file_format!r} is not one of "
                "'auto', 'csv', 'tsv', 'jsonl', 'parquet', 'hub'."
            )
        for name in ("limit", "sample"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"TextDataConfig.{name}={value!r}: pass a non-negative int, or None for all rows.")
        if self.label_names is not None:
            names = list(self.label_names.values())
            if len(set(names)) != len(names):
                raise ValueError(
                    f"TextDataConfig.label_names maps two raw labels to one name: {dict(self.label_names)}; "
                    "names must be distinct."
                )
            keys = [str(k) for k in self.label_names]
            if len(set(keys)) != len(keys):
                raise ValueError(
                    f"TextDataConfig.label_names has keys that are equal as strings: {list(self.label_names)}."
                )


# ----------------------------------------------------------------------------------------------------
# Reading raw rows
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RawTable:
    """Rows as dicts plus the column names in file order (for error messages)."""

    rows: list[dict[str, Any]]
    columns: tuple[str, ...]
    where: str


def _resolve_format(config: TextDataConfig) -> str:
    if config.file_format != "auto":
        return config.file_format
    path = Path(config.source)
    suffix = path.suffix.lower()
    if suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[suffix]
    if path.exists():
        if path.is_dir():
            raise ValueError(f"{path} is a folder, not a data file: name the .csv, .tsv, .jsonl or .parquet file in it.")
        raise ValueError(
            f"Cannot tell the format of {path} from its suffix {suffix!r}: rename it to end in .csv, .tsv, .jsonl "
            "or .parquet (in Python, TextDataConfig(file_format=...) also works)."
        )
    return "hub"


def read_text_file(path: str | Path) -> str:
    """The text of ``path``: UTF-8 (a byte-order mark, as spreadsheet software writes, is dropped), UTF-16 with a
    BOM, or else Windows-1252 / latin-1 (what older spreadsheet exports use), with a warning naming the file and
    the encoding used. Never a bare UnicodeDecodeError."""
    path = Path(path)
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} starts with a UTF-16 byte-order mark but is not valid UTF-16 ({exc}). Save it "
                             "as UTF-8.") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        for encoding in ("cp1252", "latin-1"):  # latin-1 decodes any byte sequence
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError:
                continue
            logger.warning("%s is not UTF-8 (byte 0x%02x at offset %d); read it as %s. If accents or quotes look "
                           "wrong in the outputs, save the file as UTF-8.", path, raw[exc.start], exc.start, encoding)
            return text
        raise  # pragma: no cover - latin-1 decodes every byte


def _read_delimited(path: Path, delimiter: str, limit: int | None) -> _RawTable:
    # TSV has no quoting convention (IANA text/tab-separated-values): a field is everything between
    # tabs, quotes included. SST-2 relies on this ("a sentence never contains a tab"). CSV uses the
    # usual RFC 4180 double-quote rules.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    rows: list[dict[str, Any]] = []
    text = read_text_file(path)
    # Python's csv refuses any field over 128 KiB (field_size_limit's default), so one long document (a report,
    # a chapter) would sink the whole file; no field is longer than the file, so that is the limit while reading.
    previous_limit = csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    try:
        with io.StringIO(text, newline="") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter, quoting=quoting)
            columns = tuple(reader.fieldnames or ())
            if not columns:
                raise ValueError(f"{path} is empty: expected a header line naming the columns, then one row per "
                                 "example. Point to the right file, or fill this one.")
            for row in reader:
                if limit is not None and len(rows) >= limit:
                    break
                if None in row:
                    raise ValueError(
                        f"{path} line {reader.line_num}: more fields than the {len(columns)} header columns "
                        f"{list(columns)}. If this is a CSV whose text contains commas, quote the text field."
                    )
                rows.append(row)
    finally:
        csv.field_size_limit(previous_limit)
    return _RawTable(rows=rows, columns=columns, where=str(path))


def _read_jsonl(path: Path, limit: int | None) -> _RawTable:
    rows: list[dict[str, Any]] = []
    columns: dict[str, None] = {}
    with io.StringIO(read_text_file(path)) as fh:
        for line_no, line in enumerate(fh, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {line_no}: not valid JSON ({exc}); JSONL needs one object a line.") from exc
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path} line {line_no}: expected a JSON object, got {type(row).__name__}; "
                    "JSONL needs one object a line."
                )
            columns.update(dict.fromkeys(row))
            rows.append(row)
    return _RawTable(rows=rows, columns=tuple(columns), where=str(path))


def _read_parquet(path: Path, limit: int | None) -> _RawTable:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow comes with datasets and pandas here
        raise ImportError(
            f"Reading {path} needs pyarrow; install it with `pip install ghostdp[data]` (datasets brings it)."
        ) from exc
    table = pq.read_table(path)
    if limit is not None:
        table = table.slice(0, limit)
    return _RawTable(rows=table.to_pylist(), columns=tuple(table.column_names), where=str(path))


def _read_hub(config: TextDataConfig) -> _RawTable:
    """Read a split of a Hugging Face hub dataset. Needs network access to the hub (or its cache)."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"Loading the hub dataset {config.source!r} needs the `datasets` package: "
            "`pip install ghostdp[data]`. For a local file, check that the path exists."
        ) from exc
    split = config.split if config.limit is None else f"{config.split}[:{config.limit}]"
    where = f"hub dataset {config.source!r}" + (f" ({config.hub_config})" if config.hub_config else "")
    logger.info("Loading %s split %s", where, split)
    try:
        ds = datasets.load_dataset(str(config.source), config.hub_config, split=split)
    except Exception as exc:
        raise ValueError(
            f"Could not load {where}, split {split!r}: {exc}. If {config.source!r} is meant to be a local "
            "file, it does not exist; otherwise check the dataset name and that the hub (or its cache) "
            "is reachable."
        ) from exc
    return _RawTable(rows=list(ds), columns=tuple(ds.column_names), where=f"{where} split {config.split!r}")


def _read_table(config: TextDataConfig) -> _RawTable:
    fmt = _resolve_format(config)
    if fmt == "hub":
        return _read_hub(config)
    path = Path(config.source)
    if not path.is_file():
        raise FileNotFoundError(f"Dataset file {path} does not exist (format {fmt!r}).")
    if fmt == "csv":
        return _read_delimited(path, ",", config.limit)
    if fmt == "tsv":
        return _read_delimited(path, "\t", config.limit)
    if fmt == "jsonl":
        return _read_jsonl(path, config.limit)
    return _read_parquet(path, config.limit)


# ----------------------------------------------------------------------------------------------------
# Validation and label mapping
# ----------------------------------------------------------------------------------------------------


def _label_mapper(config: TextDataConfig, where: str):
    """A function raw label -> name, or None when names come from the data itself."""
    if config.label_names is None:
        return None
    by_key = {str(k): name for k, name in config.label_names.items()}
    names = set(config.label_names.values())

    def to_name(raw: Any, row_no: int) -> str:
        key = str(raw).strip()
        if key in by_key:
            return by_key[key]
        if key in names:
            return key
        raise ValueError(
            f"{where} row {row_no}: unknown label {raw!r} in column {config.label_column!r}. "
            f"label_names knows {sorted(by_key)} (-> {sorted(names)}). Add it to label_names, "
            "or fix the row."
        )

    return to_name


def _to_labelled(table: _RawTable, config: TextDataConfig) -> LabelledTexts:
    for role, column in (("text_column", config.text_column), ("label_column", config.label_column)):
        if column not in table.columns:
            raise ValueError(
                f"{table.where} has no column {column!r} (available columns: {list(table.columns)}). "
                f"Pass {role}= one of those."
            )
    if not table.rows:
        raise ValueError(
            f"{table.where} holds no rows (only a header line, or nothing): a dataset needs at least one labelled "
            "example. Point to the right file, or fill this one."
        )
    mapper = _label_mapper(config, table.where)
    texts: list[str] = []
    labels: list[str] = []
    for row_no, row in enumerate(table.rows, start=1):
        text = row.get(config.text_column)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"{table.where} row {row_no}: empty or missing text in column {config.text_column!r} "
                f"(got {text!r}). Remove the row or fill it in; rows are never dropped silently, since "
                "the dataset size enters the privacy accounting."
            )
        raw_label = row.get(config.label_column)
        if raw_label is None or (isinstance(raw_label, str) and not raw_label.strip()):
            raise ValueError(
                f"{table.where} row {row_no}: empty or missing label in column {config.label_column!r}. "
                "Remove the row or fill it in."
            )
        labels.append(mapper(raw_label, row_no) if mapper else str(raw_label).strip())
        texts.append(text)
    if config.label_names is not None:
        label_names = tuple(config.label_names.values())
    else:
        label_names = tuple(sorted(set(labels)))
    return LabelledTexts(texts=tuple(texts), labels=tuple(labels), label_names=label_names, source=table.where)


def subsample(data: LabelledTexts, n: int, seed: int) -> LabelledTexts:
    """A uniformly random subset of ``n`` rows without replacement, original order kept.

    Drawn with ``numpy.random.default_rng(seed).choice``, so it is stable across runs and machines.
    ``n >= len(data)`` returns all rows.
    """
    if n >= len(data):
        return data
    idx = np.sort(np.random.default_rng(seed).choice(len(data), size=n, replace=False))
    return data.subset(idx.tolist())


def load_labelled_texts(config: TextDataConfig) -> LabelledTexts:
    """Read ``config.source`` into :class:`LabelledTexts` (limit, then seeded subsample)."""
    table = _read_table(config)
    data = _to_labelled(table, config)
    if config.sample is not None:
        data = subsample(data, config.sample, config.seed)
    logger.info("Loaded %d rows from %s; label counts %s", len(data), data.source, data.label_counts())
    return data


def data_hash(data: LabelledTexts) -> str:
    """A stable SHA-256 hex digest of the rows and label names, for run metadata.

    Each field is written length-prefixed in UTF-8, so no choice of separators can make two different
    datasets collide by concatenation; Python's ``hash()`` is salted per process and not used.
    Same rows in the same order and same label_names give the same digest on every machine.
    """
    h = hashlib.sha256()

    def put(s: str) -> None:
        b = s.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    put("ghostdp.LabelledTexts.v1")
    h.update(len(data.label_names).to_bytes(8, "little"))
    for name in data.label_names:
        put(name)
    h.update(len(data).to_bytes(8, "little"))
    for text, label in zip(data.texts, data.labels):
        put(label)
        put(text)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# SST-2
# ----------------------------------------------------------------------------------------------------


def default_sst2_dir() -> Path:
    """``<repo>/../shared/data/sst2``: where the shared SST-2 TSV files live beside a checkout."""
    return Path(__file__).resolve().parents[3].parent / "shared" / "data" / "sst2"


def load_sst2(
    split: Literal["train", "dev", "test"] = "train",
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> LabelledTexts:
    """SST-2 (GLUE binary sentiment) from ``{data_dir}/{split}.tsv``: columns ``label`` and ``sentence``.

    Labels 0/1 become "negative"/"positive". ``train`` plays the private dataset; ``dev`` and ``test`` are
    held-out real data for evaluation.
    """
    if split not in SST2_SPLITS:
        raise ValueError(f"load_sst2(split={split!r}): pick one of {SST2_SPLITS}.")
    root = Path(data_dir) if data_dir is not None else default_sst2_dir()
    path = root / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(
            f"SST-2 file {path} not found. Pass data_dir= the folder holding train.tsv / dev.tsv / test.tsv."
        )
    return load_labelled_texts(
        TextDataConfig(
            source=path,
            text_column="sentence",
            label_column="label",
            label_names=SST2_LABEL_NAMES,
            limit=limit,
            sample=sample,
            seed=seed,
            file_format="tsv",
        )
    )
