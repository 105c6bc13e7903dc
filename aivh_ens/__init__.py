"""aivh-ens: cross-validated timm ensembles for AI-generated vs human-made image classification."""

from __future__ import annotations

__version__ = "0.1.0"
