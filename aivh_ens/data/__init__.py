"""Inputs: validated tables, image decoding, folds, transforms, loaders and the decode-once image cache.

``tables`` and ``images`` import no torch; ``loader`` and ``cache`` do (on first use of their names).
"""

from __future__ import annotations

from aivh_ens._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "DEFAULT_TRAIN_CSV": ".tables",
        "DEFAULT_TEST_CSV": ".tables",
        "read_train_table": ".tables",
        "read_test_table": ".tables",
        "read_score_table": ".tables",
        "resolve_image_path": ".tables",
        "MIN_SIDE": ".images",
        "MAX_PIXELS": ".images",
        "BadImageError": ".images",
        "load_image": ".images",
        "decode_image": ".images",
        "image_size": ".images",
        "assign_folds": ".folds",
        "make_fold_table": ".folds",
        "ensure_fold_file": ".folds",
        "fold_file_name": ".folds",
        "read_fold_file": ".folds",
        "storage_step": ".transforms",
        "train_transform": ".transforms",
        "eval_transform": ".transforms",
        "ImageDataset": ".loader",
        "make_loader": ".loader",
        "Normalizer": ".loader",
        "ensure_cache": ".cache",
        "open_source": ".cache",
        "Verdicts": ".verdicts",
    },
)
