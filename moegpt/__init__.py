"""moegpt: small GPT-style language models with selectable Mixture-of-Experts feed-forward layers."""

__version__ = "0.1.0"
