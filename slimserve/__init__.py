"""slimserve: compress Hugging Face causal LMs and serve them as an OpenAI-compatible endpoint."""

__version__ = "0.1.0"
