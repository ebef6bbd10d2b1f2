"""distmerge: merge many fine-tuned models of one base into one checkpoint, on Ray."""

__version__ = "0.1.0"
