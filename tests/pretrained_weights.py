"""Pretrained weights for tests, written by the tests: a Hugging Face cache of timm's ``test_*`` models (the
layout ``huggingface_hub`` writes: a blob, a snapshot link to it, ``refs/main``) and weights files."""

from __future__ import annotations

from pathlib import Path

REVISION = "0" * 39 + "1"


def save_weights(path: Path, model: str) -> Path:
    """``model``'s randomly initialised state dict as a safetensors file at ``path``."""
    import timm
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(timm.create_model(model.split(".")[0]).state_dict(), str(path))
    return path


def fake_hf_cache(root: Path, models: list[str]) -> Path:
    """A Hugging Face hub cache at ``root`` holding ``timm/<model>`` for each of ``models``; returns ``root``."""
    for model in models:
        repo = root / f"models--timm--{model}"
        blob = save_weights(repo / "blobs" / f"{abs(hash(model)):x}", model)
        snap = repo / "snapshots" / REVISION
        snap.mkdir(parents=True)
        (snap / "model.safetensors").symlink_to(Path("../../blobs") / blob.name)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(REVISION)
    return root
