"""What the runs of a study share: each text embedded once, floor folders keyed by their recipe."""
from __future__ import annotations

import numpy as np

from ghostdp.integrations.synthetic.shared_eval import MemoEmbedder, SharedEvaluation


class CountingEmbedder:
    dim = 3

    def __init__(self):
        self.seen: list[str] = []

    def embed(self, texts):
        self.seen += list(texts)
        return np.array([[len(t), t.count("a"), 1.0] for t in texts], dtype=np.float32).reshape(-1, 3)


def test_memo_embedder_embeds_each_distinct_text_once_and_keeps_the_order():
    inner = CountingEmbedder()
    memo = MemoEmbedder(inner)
    first = memo.embed(["a", "bb", "a", "ccc"])
    assert inner.seen == ["a", "bb", "ccc"]
    np.testing.assert_array_equal(first, inner.embed(["a", "bb", "a", "ccc"]))
    inner.seen.clear()
    again = memo.embed(["ccc", "dddd", "a"])
    assert inner.seen == ["dddd"]  # only the new text
    np.testing.assert_array_equal(again, np.array([[3, 0, 1], [4, 0, 1], [1, 1, 1]], dtype=np.float32))
    assert memo.embed([]).shape == (0, 3) and memo.dim == 3


def test_floor_folders_are_keyed_by_everything_the_samples_depend_on(tmp_path):
    shared = SharedEvaluation(tmp_path)
    recipe = {"base_model": "m", "n": 8, "sampling": {"sample_seed": 0, "temperature": 1.0}}
    assert shared.floor_dir(recipe) == shared.floor_dir(dict(reversed(list(recipe.items()))))
    assert shared.floor_dir(recipe) != shared.floor_dir({**recipe, "sampling": {"sample_seed": 1, "temperature": 1.0}})
    assert shared.floor_dir(recipe) != shared.floor_dir({**recipe, "n": 9})
    folder = shared.floor_dir(recipe)
    assert shared.floor_targets(folder) is None  # not made yet
    folder.mkdir(parents=True)
    (folder / "synthetic_meta.json").write_text('{"targets": {"negative": 3, "positive": 5}}', encoding="utf-8")
    assert shared.floor_targets(folder) == {"negative": 3, "positive": 5}
