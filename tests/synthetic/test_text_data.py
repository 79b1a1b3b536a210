"""Loading labelled texts: every file format, the hub path (with a stand-in for the hub), every error."""

from __future__ import annotations

import json

import pytest

from ghostdp.integrations.synthetic.text_data import (
    LabelledTexts,
    TextDataConfig,
    data_hash,
    load_labelled_texts,
    load_sst2,
)

ROWS = [
    ("a gripping, well-acted film", 1),
    ('the "comedy" never lands', 0),
    ("flat and tedious", 0),
    ("warm, funny and wise", 1),
    ("an utter mess", 0),
]
NAMES = {0: "negative", 1: "positive"}
EXPECTED_TEXTS = tuple(t for t, _ in ROWS)
EXPECTED_LABELS = tuple(NAMES[y] for _, y in ROWS)


def write_csv(path, rows=ROWS, header=("sentence", "label")):
    import csv

    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_tsv(path, rows=ROWS, header=("label", "sentence")):
    lines = ["\t".join(header)] + [f"{y}\t{t}" for t, y in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path, rows=ROWS):
    path.write_text("\n".join(json.dumps({"sentence": t, "label": y, "id": i}) for i, (t, y) in enumerate(rows)) + "\n")
    return path


def write_parquet(path, rows=ROWS):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"sentence": [t for t, _ in rows], "label": [y for _, y in rows]}), path)
    return path


WRITERS = {"csv": write_csv, "tsv": write_tsv, "jsonl": write_jsonl, "parquet": write_parquet}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_each_format_reads_the_same_rows(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path / f"data.{fmt}")
    data = load_labelled_texts(TextDataConfig(path, text_column="sentence", label_names=NAMES))
    assert data.texts == EXPECTED_TEXTS  # CSV quoting of commas and TSV literal quotes both survive
    assert data.labels == EXPECTED_LABELS
    assert data.label_names == ("negative", "positive")
    assert str(path) in data.source


def test_all_formats_hash_alike_and_hash_tracks_content(tmp_path):
    hashes = {
        fmt: data_hash(load_labelled_texts(TextDataConfig(w(tmp_path / f"d.{fmt}"), text_column="sentence", label_names=NAMES)))
        for fmt, w in WRITERS.items()
    }
    assert len(set(hashes.values())) == 1, hashes
    base = load_labelled_texts(TextDataConfig(write_csv(tmp_path / "b.csv"), text_column="sentence", label_names=NAMES))
    h = data_hash(base)
    assert len(h) == 64 and h == data_hash(LabelledTexts(base.texts, base.labels, base.label_names))
    changed_text = LabelledTexts(base.texts[:-1] + ("an utter mess!",), base.labels, base.label_names)
    changed_label = LabelledTexts(base.texts, base.labels[:-1] + ("positive",), base.label_names)
    reordered = base.subset([1, 0, 2, 3, 4])
    # Length-prefixing: moving a character across a field boundary changes the hash.
    a = LabelledTexts(("ab", "c"), ("x", "x"), ("x",))
    b = LabelledTexts(("a", "bc"), ("x", "x"), ("x",))
    assert len({h, data_hash(changed_text), data_hash(changed_label), data_hash(reordered)}) == 4
    assert data_hash(a) != data_hash(b)


def test_without_mapping_labels_are_sorted_strings(tmp_path):
    data = load_labelled_texts(TextDataConfig(write_csv(tmp_path / "d.csv"), text_column="sentence"))
    assert data.label_names == ("0", "1")
    assert data.labels == tuple(str(y) for _, y in ROWS)


def test_mapping_keeps_absent_classes_and_accepts_names(tmp_path):
    rows = [("fine", "positive"), ("meh", 0)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    names = {0: "negative", 1: "positive", 2: "neutral"}
    data = load_labelled_texts(TextDataConfig(path, text_column="sentence", label_names=names))
    assert data.labels == ("positive", "negative")
    assert data.label_names == ("negative", "positive", "neutral")
    assert data.label_counts() == {"negative": 1, "positive": 1, "neutral": 0}


def test_limit_then_seeded_sample(tmp_path):
    rows = [(f"text number {i}", i % 2) for i in range(50)]
    path = write_csv(tmp_path / "d.csv", rows)
    cfg = dict(text_column="sentence", label_names=NAMES)
    first = load_labelled_texts(TextDataConfig(path, limit=7, **cfg))
    assert first.texts == tuple(f"text number {i}" for i in range(7))
    s1 = load_labelled_texts(TextDataConfig(path, sample=10, seed=3, **cfg))
    s2 = load_labelled_texts(TextDataConfig(path, sample=10, seed=3, **cfg))
    s3 = load_labelled_texts(TextDataConfig(path, sample=10, seed=4, **cfg))
    assert s1 == s2 and s1 != s3
    idx = [int(t.split()[-1]) for t in s1.texts]
    assert len(set(idx)) == 10 and idx == sorted(idx)  # without replacement, file order kept
    assert all(y == NAMES[i % 2] for i, y in zip(idx, s1.labels))  # rows stay paired with their labels
    both = load_labelled_texts(TextDataConfig(path, limit=12, sample=5, seed=0, **cfg))
    assert all(int(t.split()[-1]) < 12 for t in both.texts)
    assert len(load_labelled_texts(TextDataConfig(path, sample=500, **cfg))) == 50


def test_missing_column_names_file_column_available_and_fix(tmp_path):
    path = write_csv(tmp_path / "reviews.csv")
    with pytest.raises(ValueError) as err:
        load_labelled_texts(TextDataConfig(path, text_column="text"))
    msg = str(err.value)
    assert "reviews.csv" in msg and "'text'" in msg and "['sentence', 'label']" in msg and "text_column=" in msg
    with pytest.raises(ValueError, match=r"no column 'y'.*label_column="):
        load_labelled_texts(TextDataConfig(path, text_column="sentence", label_column="y"))


def test_empty_text_is_an_error_with_row_number(tmp_path):
    path = write_tsv(tmp_path / "d.tsv", ROWS[:2] + [("   ", 1)])
    with pytest.raises(ValueError) as err:
        load_labelled_texts(TextDataConfig(path, text_column="sentence"))
    assert "d.tsv row 3" in str(err.value) and "'sentence'" in str(err.value)
    path = write_jsonl(tmp_path / "m.jsonl", ROWS[:1])
    with path.open("a") as fh:
        fh.write(json.dumps({"label": 1}) + "\n")  # a row without the text field
    with pytest.raises(ValueError, match=r"m\.jsonl row 2: empty or missing text"):
        load_labelled_texts(TextDataConfig(path, text_column="sentence"))


def test_unknown_label_is_an_error(tmp_path):
    path = write_csv(tmp_path / "d.csv", ROWS[:2] + [("odd one", 7)])
    with pytest.raises(ValueError) as err:
        load_labelled_texts(TextDataConfig(path, text_column="sentence", label_names=NAMES))
    msg = str(err.value)
    assert "d.csv row 3" in msg and "unknown label '7'" in msg and "label_names" in msg


def test_missing_label_and_bad_config(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("ok", 1), ("no label", "")])
    with pytest.raises(ValueError, match="row 2: empty or missing label"):
        load_labelled_texts(TextDataConfig(path, text_column="sentence"))
    with pytest.raises(ValueError, match="two raw labels to one name"):
        TextDataConfig(path, label_names={0: "x", 1: "x"})
    with pytest.raises(ValueError, match="limit"):
        TextDataConfig(path, limit=-1)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_labelled_texts(TextDataConfig(tmp_path / "missing.csv"))
    weird = tmp_path / "d.txt"
    weird.write_text("x")
    with pytest.raises(ValueError, match="file_format="):
        load_labelled_texts(TextDataConfig(weird))


def test_csv_with_extra_unquoted_field_is_explained(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("sentence,label\nfunny, sharp and wise,1\n")
    with pytest.raises(ValueError, match="quote the text field"):
        load_labelled_texts(TextDataConfig(path, text_column="sentence"))


def test_hub_path_goes_through_datasets_load_dataset(monkeypatch):
    """The hub cannot be reached here; a stand-in load_dataset checks what ghostdp asks for."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config_name, split):
        calls.append((name, config_name, split))
        return datasets.Dataset.from_dict({"sentence": [t for t, _ in ROWS[:3]], "label": [y for _, y in ROWS[:3]]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_labelled_texts(
        TextDataConfig("glue", hub_config="sst2", split="validation", limit=3, text_column="sentence", label_names=NAMES)
    )
    assert calls == [("glue", "sst2", "validation[:3]")]
    assert data.texts == EXPECTED_TEXTS[:3] and data.labels == EXPECTED_LABELS[:3]
    assert "glue" in data.source
    with pytest.raises(ValueError, match=r"hub dataset 'glue'.*available columns: \['sentence', 'label'\]"):
        load_labelled_texts(TextDataConfig("glue", hub_config="sst2", text_column="text"))


def test_hub_failure_is_explained(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def failing(name, config_name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(ValueError, match="does not exist; otherwise check the dataset name"):
        load_labelled_texts(TextDataConfig("no/such-dataset"))


def test_labelled_texts_validates_itself():
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        LabelledTexts(("a", "b"), ("x",), ("x",))
    with pytest.raises(ValueError, match=r"\['y'\] are not in label_names"):
        LabelledTexts(("a",), ("y",), ("x",))
    d = LabelledTexts(["a", "b"], ["x", "y"], ["x", "y"])
    assert isinstance(d.texts, tuple) and d.examples() == [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]


def test_sst2_shared_files(sst2_dir):
    train = load_sst2("train", data_dir=sst2_dir)
    dev = load_sst2("dev", data_dir=sst2_dir)
    test = load_sst2("test", data_dir=sst2_dir)
    assert (len(train), len(dev), len(test)) == (67_349, 872, 1_821)  # counts in the data README
    assert train.label_names == ("negative", "positive")
    assert train.texts[0] == "hide new secretions from the parental units" and train.labels[0] == "negative"
    assert dev.label_counts() == {"negative": 428, "positive": 444}
    # The default location is <repo>/../shared/data/sst2.
    assert load_sst2("dev", limit=5) == dev.subset(range(5))
    sample = load_sst2("train", data_dir=sst2_dir, sample=100, seed=0)
    assert len(sample) == 100 and set(sample.texts) <= set(train.texts)
    with pytest.raises(ValueError, match="pick one of"):
        load_sst2("validation", data_dir=sst2_dir)
