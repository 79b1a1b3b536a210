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


def test_refusal_errors_and_audit_contract_are_public():
    import ghostdp
    from ghostdp.audit import epsilon_lower_bound
    from ghostdp.engine.errors import BatchMismatchError, UnclippedGradientError, UnsupportedModuleError

    assert ghostdp.UnclippedGradientError is UnclippedGradientError
    assert ghostdp.BatchMismatchError is BatchMismatchError
    assert ghostdp.UnsupportedModuleError is UnsupportedModuleError
    params = inspect.signature(epsilon_lower_bound).parameters
    for name in ("num_guesses", "num_correct", "confidence", "delta", "num_canaries"):
        assert name in params, name
