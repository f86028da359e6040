"""pmpclean: audit and clean noisy image-caption datasets."""

from __future__ import annotations

__version__ = "0.1.0"
