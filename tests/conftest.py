"""Shared test set-up: offline, quiet, deterministic, single-threaded where it matters."""

from __future__ import annotations

import os

# Set before any test module imports timm/huggingface_hub/albumentations (they read these at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
