"""samebox: one pinned GPU fine-tuning environment, delivered as an image or a setup script, proven identical."""

__version__ = "0.1.0"
