"""The names that checks outside the repo call exist where the issues' contracts put them."""
import inspect


def test_contract_names_import():
    import ghostdp
    from ghostdp.integrations import DPTrainer, DPTrainingArguments  # noqa: F401

    sig = inspect.signature(ghostdp.PrivacyEngine)
    for name in ("max_grad_norm", "expected_batch_size", "noise_multiplier", "loss_reduction", "clipping",
                 "sample_rate", "generator"):
        assert sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert sig.parameters["loss_reduction"].default == "mean" and sig.parameters["clipping"].default == "auto"
    for fn in (ghostdp.accounting.epsilon, ghostdp.accounting.calibrate_noise_multiplier):
        assert "accountant" in inspect.signature(fn).parameters
    assert ghostdp.data.PoissonBatchSampler
    assert issubclass(ghostdp.UnsupportedModuleError, Exception)
    for attr in ("per_sample_norms", "epsilon", "steps", "state_dict", "load_state_dict", "detach"):
        assert hasattr(ghostdp.PrivacyEngine, attr) or attr in ("per_sample_norms", "steps"), attr
