"""Public data helpers: Poisson sampling for DP-SGD and a collate that tolerates empty batches."""
from ghostdp.engine.sampling import PoissonBatchSampler, collate_with_empty

__all__ = ["PoissonBatchSampler", "collate_with_empty"]
