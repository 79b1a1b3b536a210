"""The DP engine: per-layer clipping rules, the privacy engine, sampling and accounting."""
