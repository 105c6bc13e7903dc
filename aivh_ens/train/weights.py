"""Pretrained weights this machine holds: timm models in the Hugging Face cache and in a weights folder.

Only look-ups on disk, never a download. A Hugging Face cache keeps a timm model's weights in
``<cache>/models--timm--<name>/snapshots/<revision>/model.safetensors`` (``<cache>``: ``HF_HUB_CACHE``, else
``HF_HOME/hub``, else ``~/.cache/huggingface/hub``). A weights folder (``--weights-dir``) may hold files named
after their models (``convnext_tiny.safetensors``, ``convnext_tiny.fb_in22k_ft_in1k.safetensors``), folders
named after them with a ``model.safetensors`` inside (a copied Hugging Face repository), or a copy of a Hugging
Face cache (its ``models--timm--*`` folders).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from aivh_ens.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
REPO_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
"""Weights files of a timm repository on the Hugging Face Hub, preferred first."""


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment names it now (``HF_HUB_CACHE``, ``HF_HOME``), read at
    call time so that a notebook that sets them after import is followed."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = (
        os.environ.get("HF_HOME")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    )
    return Path(home) / "hub"


@functools.lru_cache(maxsize=1)
def _names_by_repo() -> dict[str, tuple[str, ...]]:
    """timm's pretrained names by the Hugging Face repository that holds their weights (several names may
    share one: CLIP's ``quickgelu`` variants load the same file)."""
    import timm
    from timm.models import get_pretrained_cfg

    out: dict[str, list[str]] = {}
    for name in timm.list_pretrained():
        pcfg = get_pretrained_cfg(name)
        if pcfg is not None and pcfg.hf_hub_id:
            out.setdefault(pcfg.hf_hub_id.partition("@")[0], []).append(name)
    return {k: tuple(v) for k, v in out.items()}


def _timm_name(repo_id: str) -> str | None:
    """The timm name to load a cached ``timm/<name>`` repository as: the quickgelu variant where timm offers
    one (OpenAI's CLIP weights were trained with QuickGELU; the same file loads into both), else the name the
    repository is named after."""
    import timm

    names = _names_by_repo().get(repo_id, ())
    quick = [n for n in names if "quickgelu" in n]
    if quick:
        return quick[0]
    name = repo_id.split("/", 1)[1]
    return name if name in names or (not names and timm.is_model(name)) else (names[0] if names else None)


def hf_cache_weights(cache_dir: Path | None = None) -> dict[str, Path]:
    """timm name -> weights file of every timm model in a Hugging Face cache (newest revision), {} when the
    cache is absent or unreadable."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache_dir or hf_cache_dir())
    except Exception:  # CacheNotFound, an unreadable folder: nothing held
        return {}
    out: dict[str, Path] = {}
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.repo_id.startswith("timm/"):
            continue
        name = _timm_name(repo.repo_id)
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            files = {f.file_name: f.file_path for f in rev.files}
            found = next((files[f] for f in REPO_FILES if f in files), None)
            if name and found is not None:
                out[name] = found
                break
    return out


def _model_name(stem: str) -> str | None:
    """The timm name a file or folder is named after (with its pretrained tag when timm knows the tag)."""
    import timm
    from timm.models import get_pretrained_cfg

    arch = stem.split(".")[0]
    if not timm.is_model(arch):
        return None
    return stem if "." in stem and get_pretrained_cfg(stem) is not None else arch


def weights_dir_weights(weights_dir: Path) -> dict[str, Path]:
    """timm name -> weights file in a weights folder (the three layouts of the module docstring).

    Raises:
        UserError: the folder is missing, or holds no weights of a timm model.
    """
    if not weights_dir.is_dir():
        raise UserError(f"weights_dir={str(weights_dir)!r} (--weights-dir) is not a folder")
    out = {}
    for hub in (weights_dir, weights_dir / "hub"):
        if hub.is_dir() and any(hub.glob("models--timm--*")):
            out.update(hf_cache_weights(hub))
    for p in sorted(weights_dir.iterdir()):
        stem = p.name[: -len(p.suffix)] if p.suffix in WEIGHT_SUFFIXES else p.name
        name = _model_name(stem)
        if name is None:
            continue
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES:
            out[name] = p.absolute()
        elif p.is_dir():
            found = next((p / f for f in REPO_FILES if (p / f).is_file()), None)
            if found is not None:
                out[name] = found.absolute()
    if not out:
        raise UserError(
            f"--weights-dir {weights_dir}: no weights of a timm model found; name each file after its model "
            "(convnext_tiny.safetensors or convnext_tiny.fb_in22k_ft_in1k.safetensors), or copy a Hugging Face "
            "cache's models--timm--<name> folders there"
        )
    return out


def local_weights(weights_dir: Path | None = None) -> dict[str, Path]:
    """timm name -> weights file of every pretrained timm model this machine holds: the Hugging Face cache,
    and ``weights_dir`` (``--weights-dir``), whose files win for the same name."""
    out = hf_cache_weights()
    if weights_dir is not None:
        out.update(weights_dir_weights(weights_dir))
    return dict(sorted(out.items()))
