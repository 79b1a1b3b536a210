"""Hyperparameter-ranking fidelity on planted grids whose rank correlations and regret are known."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ghostdp.integrations.synthetic.hparam import (
    HParamGrid,
    hparam_fidelity,
    parse_grid,
    rank_fidelity,
    score_grid,
    write_hparam,
)
from ghostdp.integrations.synthetic.text_data import LabelledTexts


def planted(real: dict[float, float], synthetic: dict[float, float]):
    """Fake trainer: the accuracy is a known function of C per side."""
    return lambda side, cfg: (real if side == "real" else synthetic)[cfg["C"]]


def test_identical_ranking_gives_one_and_zero_regret():
    grid = HParamGrid(C=(0.01, 0.1, 1.0, 10.0), class_weight=(None,))
    real = {0.01: 0.60, 0.1: 0.70, 1.0: 0.85, 10.0: 0.80}
    syn = {0.01: 0.50, 0.1: 0.55, 1.0: 0.75, 10.0: 0.65}  # other values, same order
    res = score_grid(grid.configs(), planted(real, syn))
    assert res["spearman"] == pytest.approx(1.0) and res["kendall"] == pytest.approx(1.0)
    assert res["regret"] == 0.0 and res["best_real"] == res["best_synthetic"] == 2


def test_reversed_ranking_gives_minus_one_and_full_regret():
    grid = HParamGrid(C=(0.01, 0.1, 1.0, 10.0), class_weight=(None,))
    real = {0.01: 0.60, 0.1: 0.70, 1.0: 0.80, 10.0: 0.90}
    syn = {0.01: 0.90, 0.1: 0.80, 1.0: 0.70, 10.0: 0.60}
    res = score_grid(grid.configs(), planted(real, syn))
    assert res["spearman"] == pytest.approx(-1.0) and res["kendall"] == pytest.approx(-1.0)
    assert res["best_synthetic"] == 0 and res["best_real"] == 3
    assert res["regret"] == pytest.approx(0.90 - 0.60)


def test_one_swap_known_values():
    # Ranks real 1,2,3,4,5; synthetic swaps the top two: Spearman 1 - 6*2/(5*24) = 0.9, Kendall (9-1)/10 = 0.8.
    real = [0.50, 0.60, 0.70, 0.80, 0.90]
    syn = [0.40, 0.45, 0.50, 0.70, 0.65]
    res = rank_fidelity(syn, real)
    assert res["spearman"] == pytest.approx(0.9) and res["kendall"] == pytest.approx(0.8)
    assert res["best_synthetic"] == 3 and res["best_real"] == 4
    assert res["regret"] == pytest.approx(0.10)


def test_constant_side_has_undefined_correlation_but_a_regret():
    res = rank_fidelity([0.5, 0.5, 0.5], [0.6, 0.9, 0.7])
    assert res["spearman"] is None and res["kendall"] is None and "undefined" in res["note"]
    assert res["best_synthetic"] == 0 and res["regret"] == pytest.approx(0.3)  # ties: first in grid order


def test_grid_product_order_and_parse():
    g = parse_grid("C=0.1,1; class_weight=none,balanced")
    assert g.classifier == "linear_probe"
    assert g.configs() == [{"C": 0.1, "class_weight": None}, {"C": 0.1, "class_weight": "balanced"},
                           {"C": 1.0, "class_weight": None}, {"C": 1.0, "class_weight": "balanced"}]
    f = parse_grid("lr=1e-5,5e-5;epochs=1,3")
    assert f.classifier == "minilm" and len(f.configs()) == 4 and f.configs()[0] == {"lr": 1e-5, "epochs": 1,
                                                                                      "weight_decay": 0.01}
    with pytest.raises(ValueError, match="mixes"):
        parse_grid("C=1;lr=1e-5")
    with pytest.raises(ValueError, match="unknown"):
        parse_grid("gamma=1")
    with pytest.raises(ValueError, match="not valid"):
        parse_grid("C=abc")
    with pytest.raises(ValueError, match="must be > 0"):
        parse_grid("C=0")


class BagOfWords:
    """A deterministic stand-in embedder: counts of a fixed vocabulary."""

    vocab = ("good", "great", "bad", "awful", "film", "plot")

    def embed(self, texts):
        return np.array([[t.split().count(w) for w in self.vocab] for t in texts], dtype=np.float64)


def test_linear_probe_grid_end_to_end_writes_table_and_plot(tmp_path):
    names = ("neg", "pos")
    rng = np.random.default_rng(0)

    def sample(n, flip):
        texts, labels = [], []
        for i in range(n):
            y = names[i % 2]
            words = ["good", "great"] if (y == "pos") != (rng.random() < flip) else ["bad", "awful"]
            texts.append(" ".join(rng.choice(words + ["film", "plot"], size=6)))
            labels.append(y)
        return LabelledTexts(texts, labels, names)

    grid = HParamGrid(C=(0.001, 1.0), class_weight=(None, "balanced"))
    res = hparam_fidelity(grid, synthetic=sample(40, 0.2), private=sample(40, 0.05), heldout=sample(40, 0.0),
                          embedder=BagOfWords())
    assert len(res["rows"]) == 4 and all(0 <= r["accuracy_real"] <= 1 for r in res["rows"])
    paths = write_hparam(res, tmp_path / "hparam")
    assert json.loads(paths["json"].read_text())["rows"][0]["config"] == {"C": 0.001, "class_weight": None}
    md = paths["md"].read_text()
    assert "Spearman" in md and "Kendall" in md and "Regret" in md and "(real-best)" in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
