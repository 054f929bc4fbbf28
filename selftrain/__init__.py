"""selftrain: make language models better without human labels."""

__version__ = "0.1.0"
