"""keel: an LLM pretraining stack in JAX engineered for goodput."""

__version__ = "0.1.0"
