"""Offline by default, set before anything imports huggingface_hub or albumentations.

Unless the user set ``HF_HUB_OFFLINE``, the CLI sets it to 1 (``HF_HUB_OFFLINE=0`` lets timm download
weights): offline, each hub look-up waits about 47 s before it fails.
"""

from __future__ import annotations

import os

HUB_OFFLINE_FROM_USER = os.environ.get("HF_HUB_OFFLINE")
"""The user's own ``HF_HUB_OFFLINE`` (None: the CLI set it to 1), for ``aivh-ens checks``."""
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
