"""Checkpoints that record how their model was made (torchvision references style).

A checkpoint is ``torch.save`` of ``{"model": state_dict, "profile": profile.to_dict(),
"kind": "detector" | "classifier", "extra": {...}}``; loading rebuilds the network from the
stored profile, so a model is never paired with settings other than its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from wff.config import Profile, profile_from_dict

KINDS = ("detector", "classifier")


def save_checkpoint(path: str | Path, model: nn.Module, profile: Profile, kind: str, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights with the profile and ``kind``; ``extra`` holds plain values
    (epochs, timings, metrics). Weights are saved from CPU copies."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"model": state, "profile": profile.to_dict(), "kind": kind, "extra": dict(extra or {})}, path)
    return path


def load_checkpoint(path: str | Path, kind: str) -> tuple[dict[str, Any], Profile]:
    """The raw checkpoint dict and its profile; raises ValueError if it holds another kind."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no checkpoint here; train a model first (wff train)") from e
    if not isinstance(ckpt, dict) or not {"model", "profile", "kind"} <= set(ckpt):
        raise ValueError(f"{path}: not a spine-wff checkpoint (expected keys model, profile, kind)")
    if ckpt["kind"] != kind:
        raise ValueError(f"{path}: holds a {ckpt['kind']!r} model, expected a {kind!r}")
    return ckpt, profile_from_dict(ckpt["profile"], where=f"{path}:profile")


def load_detector(path: str | Path, device: str = "cpu"):
    """-> (FasterRCNN in eval mode on ``device``, its Profile)."""
    from wff.training.models import build_detector

    ckpt, profile = load_checkpoint(path, "detector")
    model = build_detector(profile)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), profile


def load_classifier(path: str | Path, device: str = "cpu"):
    """-> (ResNeXt3d in eval mode on ``device``, its Profile)."""
    from wff.training.models import build_classifier

    ckpt, profile = load_checkpoint(path, "classifier")
    model = build_classifier(profile)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), profile


__all__ = ["save_checkpoint", "load_checkpoint", "load_detector", "load_classifier"]
