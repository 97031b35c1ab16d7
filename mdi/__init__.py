"""mdi: model-distributed inference for GPT models."""

__version__ = "0.1.0"
