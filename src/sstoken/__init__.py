"""sstoken: token-level data selection for supervised fine-tuning (ssToken, ICLR 2026, and baselines)."""

__version__ = "0.1.0"
