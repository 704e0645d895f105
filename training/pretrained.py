"""Initialisation from local pretrained state dicts (``detector.weights``, ``classifier.weights``).

Nothing is downloaded: the settings name files a site saved once by hand (docs/training.md).

* ``detector.weights``: torchvision's ``resnext101_32x8d`` state dict (ImageNet layout:
  ``conv1.weight`` (64, 3, 7, 7), ``bn1``, ``layer1`` .. ``layer4``, ``fc``), loaded into the
  ``resnext101_dcn`` backbone (``backbone.body.*``). The 3x3 convolutions that became DCNv1
  take the file's ``conv2.weight`` as ``conv2.conv.weight``; their offset convolutions have
  no pretrained counterpart and stay zero (a regular convolution), the FPN and the heads stay
  random, ``fc`` is unused.
* ``classifier.weights``: a 3D ResNeXt state dict in this project's layout (``stem.0``,
  ``stem.1``, ``stages.<i>.<j>``, ``fc``: what ``torch.save(build_classifier(p).state_dict())``
  writes) or in 3D-ResNets-PyTorch's (``conv1``, ``bn1``, ``layer1`` .. ``layer4``,
  ``downsample``, ``fc``; a ``{"state_dict": ...}`` wrapper and DataParallel's ``module.``
  prefix are accepted). A head of another class count (Kinetics' 400) is left random.

The first convolution of an RGB file ``(out, 3, ...)`` is **summed** over its input channels
to ``(out, 1, ...)``: a grey image fed to the colour network as (x, x, x) gives
``sum_c W_c * x``, so the summed kernel keeps the colour model's response to grey images
(a mean would divide it by 3 and leave the BatchNorm statistics that follow off by that
factor).

A file is refused (ValueError naming it and what it holds) when it is not a torch file, not a
state dict, or when fewer than ``MIN_MATCH`` of the target's pretrainable tensors load from it
(another architecture).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from wff.config import Profile

KINDS = ("detector", "classifier")
MIN_MATCH = 0.9  # share of the target's pretrainable tensors that must load, else the file is another architecture
FIRST_CONV = {"detector": "backbone.body.conv1.weight", "classifier": "stem.0.weight"}
_WRAPPERS = ("state_dict", "model", "model_state_dict")  # dict keys that may hold the state dict itself
_HARA = ((r"^conv1\.", "stem.0."), (r"^bn1\.", "stem.1."), (r"\.downsample\.", ".shortcut."))


def _describe(state: dict[str, Tensor]) -> str:
    """What a state dict looks like: its size, first convolution and blocks per stage."""
    stages: dict[str, int] = {}
    for key in state:
        m = re.match(r"^(layer\d+|stages\.\d+)\.(\d+)\.", key)
        if m:
            stages[m.group(1)] = max(stages.get(m.group(1), 0), int(m.group(2)) + 1)
    first = next((k for k, v in state.items() if v.dim() >= 4), None)
    conv = f"first conv {first} {tuple(state[first].shape)}" if first else "no convolution"
    blocks = ", ".join(f"{k}: {v}" for k, v in stages.items()) or "none found"
    return f"{len(state)} tensors, {conv}, blocks per stage ({blocks})"


def read_state_dict(path: str | Path, setting: str) -> dict[str, Tensor]:
    """The tensors of the state dict at ``path`` (wrappers and a ``module.`` prefix removed).

    ``setting`` (e.g. ``"detector.weights"``) names the option in errors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{setting}={path}: no such file; give a local state dict (docs/training.md says where one comes from)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises several types for non-torch files
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{setting}={path}: not a PyTorch state dict file that torch.load can read ({type(e).__name__}: {first}); "
            "save one with torch.save(model.state_dict(), PATH)"
        ) from e
    for key in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        shape = f" of shape {tuple(obj.shape)}" if isinstance(obj, Tensor) else ""
        raise ValueError(f"{setting}={path}: holds a {type(obj).__name__}{shape}, not a state dict (tensor names -> tensors); "
                         "save one with torch.save(model.state_dict(), PATH)")
    state = {}
    for key, value in obj.items():
        if isinstance(value, Tensor):
            key = key[len("module."):] if key.startswith("module.") else key
            state[key[len("backbone.body."):] if key.startswith("backbone.body.") else key] = value
    if not state:
        raise ValueError(f"{setting}={path}: a dict without tensors (keys {sorted(map(str, obj))[:8]}), not a state dict; "
                         "save one with torch.save(model.state_dict(), PATH)")
    return state


def _pretrainable(kind: str, target: dict[str, Tensor]) -> list[str]:
    """Target tensors a pretrained file is expected to provide."""
    if kind == "detector":
        return [k for k in target if k.startswith("backbone.body.") and ".offset." not in k]
    return [k for k in target if not k.startswith("fc.")]


def _target_name(kind: str, key: str, target: dict[str, Tensor]) -> str | None:
    if kind == "detector":
        name = "backbone.body." + key
        if name not in target and key.endswith(".conv2.weight"):
            name = "backbone.body." + key[: -len("weight")] + "conv.weight"  # DCN wraps the 3x3 conv
        return name if name in target else None
    if key in target:
        return key
    name = key
    for pattern, repl in _HARA:
        name = re.sub(pattern, repl, name)
    name = re.sub(r"^layer(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.", name)
    return name if name in target else None


def load_pretrained(model: nn.Module, kind: str, path: str | Path) -> dict:
    """Copy the tensors of the state dict at ``path`` into ``model`` (a ``build_detector`` or
    ``build_classifier`` network) and return what happened:

    ``{"file", "loaded", "expected", "missing", "unexpected", "shape_mismatch", "first_conv"}``:
    ``loaded`` of ``expected`` pretrainable tensors took the file's values; ``missing`` lists
    pretrainable tensors the file lacks, ``unexpected`` file tensors with no place in the model,
    ``shape_mismatch`` ``"name file_shape -> model_shape"`` entries. Raises ValueError when fewer
    than ``MIN_MATCH`` of the pretrainable tensors load.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    setting = f"{kind}.weights"
    state = read_state_dict(path, setting)
    target = model.state_dict()
    pretrainable = _pretrainable(kind, target)
    if kind == "detector" and FIRST_CONV["detector"] not in target:
        raise ValueError(f"{setting}={path}: the detector backbone is not resnext101_dcn; torchvision's resnext101_32x8d "
                         "weights fit only detector.backbone=resnext101_dcn (the paper profile); unset detector.weights")
    updates: dict[str, Tensor] = {}
    unexpected, mismatch, first_conv = [], [], "as in the file"
    for key, value in state.items():
        name = _target_name(kind, key, target)
        if name is None:
            unexpected.append(key)
            continue
        want = target[name]
        if name == FIRST_CONV[kind] and value.dim() == want.dim() and value.shape[1] == 3 and want.shape[1] == 1 \
                and value.shape[0] == want.shape[0] and value.shape[2:] == want.shape[2:]:
            value = value.sum(dim=1, keepdim=True)
            first_conv = f"{key} {tuple(state[key].shape)} summed over its 3 input channels"
        if value.shape != want.shape:
            mismatch.append(f"{key} {tuple(value.shape)} -> {name} {tuple(want.shape)}")
            continue
        updates[name] = value.to(want.dtype)
    loaded = [k for k in pretrainable if k in updates]
    missing = [k for k in pretrainable if k not in updates]
    report = {
        "file": str(path),
        "loaded": len(loaded),
        "expected": len(pretrainable),
        "missing": missing,
        "unexpected": unexpected,
        "shape_mismatch": mismatch,
        "first_conv": first_conv,
    }
    if len(loaded) < MIN_MATCH * len(pretrainable):
        raise ValueError(
            f"{setting}={path}: not the {kind}'s architecture: {len(loaded)} of its {len(pretrainable)} tensors match "
            f"(need {MIN_MATCH:.0%}; {len(mismatch)} of another shape, {len(unexpected)} with no place, {len(missing)} missing); "
            f"the file holds {_describe(state)}. Give the state dict docs/training.md names, or unset {setting}"
        )
    with torch.no_grad():
        for name, value in updates.items():
            target[name].copy_(value)  # state_dict() tensors share storage with the parameters and buffers
    return report


def summary_line(kind: str, report: dict) -> str:
    """One line for the training log."""
    line = (f"{kind} initialised from {report['file']}: {report['loaded']}/{report['expected']} tensors loaded, "
            f"{len(report['missing'])} missing, {len(report['unexpected'])} unused, {len(report['shape_mismatch'])} of another shape; "
            f"first conv: {report['first_conv']}")
    return line


def init_pretrained(model: nn.Module, kind: str, profile: Profile) -> dict | None:
    """Load ``profile.<kind>.weights`` into ``model`` when set (what fit_detector / fit_classifier
    call after building); None when the model trains from scratch."""
    path = getattr(profile, kind).weights
    return load_pretrained(model, kind, path) if path else None


def check_pretrained(profile: Profile, progress: Callable[[str], None]) -> dict:
    """Build each model whose weights are set and load them, before any training: a wrong file is
    refused at once, and the reports (for train_report.json) are logged through ``progress``."""
    from wff.training.models import build_classifier, build_detector

    reports = {}
    for kind, build in (("detector", build_detector), ("classifier", build_classifier)):
        if getattr(profile, kind).weights:
            report = init_pretrained(build(profile), kind, profile)
            progress(summary_line(kind, report))
            reports[kind] = report
    return reports
