"""``ghostdp pipeline --audit-canaries m``: a separate audit run whose bound goes into the report; the release
is untouched by it (no canary in model/ or synthetic/, the same model bytes as a run without the audit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ghostdp.cli import main
from ghostdp.integrations.synthetic import audit_section
from ghostdp.integrations.synthetic.config import ConfigError, build_run_config, load_toml
from tests.synthetic.test_pipeline_cli import tiny_setup  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _pipeline(cfg: Path, run: Path, *extra: str) -> int:
    return main(["pipeline", "--config", str(cfg), "--run-dir", str(run), "--no-progress", *extra])


def test_audit_section_is_a_separate_run_and_is_reused(tiny_setup, capsys, monkeypatch):  # noqa: F811
    root, cfg = tiny_setup
    audited, plain = root / "audited", root / "plain"
    assert _pipeline(cfg, audited, "--audit-canaries", "12") == 0
    out = capsys.readouterr().out
    assert "audit (12 canaries, separate run" in out and "epsilon >= " in out

    metrics = json.loads((audited / "metrics.json").read_text())
    a = metrics["audit"]
    assert a["num_canaries"] == 12 and 0 < a["num_guesses"] <= 12 and 0 <= a["num_correct"] <= a["num_guesses"]
    assert a["epsilon_lower_bound"] >= 0 and a["confidence"] == 0.95 and a["seconds"] > 0
    assert a["exceeds_claim"] is False and a["epsilon_lower_bound"] <= a["accountant_epsilon"]
    # the audit run's q = B / (N + m) < B / N and the same steps and sigma target: no more epsilon than the release
    assert a["accountant_epsilon"] <= metrics["metrics"]["privacy"]["epsilon_train"] + 1e-6
    assert a["steps"] == metrics["metrics"]["privacy"]["steps"]
    assert (audited / a["plot"]).is_file() and a["plot"].startswith("audit/")
    report = (audited / "report.md").read_text()
    assert "## Privacy audit (separate run" in report and f"| 12 | {a['num_correct']}/{a['num_guesses']} |" in report
    assert "![audit scores in vs out](audit/audit_scores.png)" in report and "time" in report

    # No canary (text or token ids as text) anywhere in the run folder, least of all in model/ or synthetic/.
    config = build_run_config(load_toml(audited / "config.toml"))
    assert config.evaluate.audit_canaries == 12
    info = json.loads((audited / "model" / "ghostdp_model.json").read_text())
    from transformers import AutoTokenizer

    canaries = audit_section.audit_canaries(config, info, AutoTokenizer.from_pretrained(str(audited / "model")))
    assert canaries is not None and len(canaries) == 12 and canaries.included.any()
    blobs = _files(audited)
    assert any(k.startswith("synthetic/") for k in blobs) and any(k.startswith("model/") for k in blobs)
    for text in canaries.texts:
        assert len(text.split()) >= 8
        for name, blob in blobs.items():
            assert text.encode() not in blob, (name, text)
    assert not any(k.startswith(("model/audit", "synthetic/audit")) for k in blobs)

    # The released model is byte-identical to a run without the audit (same dp_seed).
    assert _pipeline(cfg, plain) == 0
    capsys.readouterr()
    released, baseline = _files(audited / "model"), _files(plain / "model")
    assert released.keys() == baseline.keys()
    for name in released:
        if name == "ghostdp_model.json":  # a fresh run_id and data-fingerprint key per run
            x, y = json.loads(released[name]), json.loads(baseline[name])
            for d in (x, y):
                d.pop("run_id"), d["data"].pop("fingerprint")
            assert x == y
        else:
            assert released[name] == baseline[name], name
    assert not (plain / "audit").exists() and "audit" not in json.loads((plain / "metrics.json").read_text())

    # Re-running the same command reuses the finished audit (no second audit run).
    def refuse(*args, **kwargs):
        raise AssertionError("the finished audit was run again")

    monkeypatch.setattr(audit_section, "audit_model", refuse)
    assert _pipeline(cfg, audited, "--audit-canaries", "12") == 0
    again = json.loads((audited / "metrics.json").read_text())["audit"]
    assert again == a
    assert (audited / "report.md").read_text().count("## Privacy audit (separate run") == 1


def test_audit_bound_above_the_claim_fails_loudly(tiny_setup, capsys, monkeypatch):  # noqa: F811
    """The wiring of a failed audit: a claim below any lower bound (-1) must give exit 3 and a loud report."""
    root, cfg = tiny_setup
    real = audit_section.audit_model

    def claim_too_low(*args, **kwargs):
        result, canaries = real(*args, **kwargs)
        result.claimed_epsilon = -1.0
        return result, canaries

    monkeypatch.setattr(audit_section, "audit_model", claim_too_low)
    run = root / "run"
    assert _pipeline(cfg, run, "--audit-canaries", "4") == 3
    assert "PRIVACY AUDIT FAILED" in capsys.readouterr().out
    assert "PRIVACY AUDIT FAILED" in (run / "report.md").read_text()
    assert json.loads((run / "metrics.json").read_text())["audit"]["exceeds_claim"] is True


@pytest.mark.parametrize("m", [1, -2])
def test_audit_canaries_must_be_zero_or_at_least_two(m):
    with pytest.raises(ConfigError, match="audit_canaries"):
        build_run_config({"evaluate": {"audit_canaries": m}})
