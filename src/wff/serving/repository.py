"""Write a complete Triton model repository for one deployment target.

    wff repo build --target embedded --artifacts runs/small repo/

Every ``config.pbtxt`` is generated from ``wff.contracts`` (tensor names, dtypes, dims, the
ensemble wiring) and the profile's ``serving`` section, as ``model_config_pb2`` messages
printed with ``text_format``, so it always parses. Every step has a dynamic batcher, the
non-batching Python steps too (it then passes one request at a time), because its queue policy
is what sheds load: ``serving.max_queue_size`` requests waiting per step and
``serving.queue_timeout_us`` of waiting, beyond which Triton rejects a request with UNAVAILABLE.
The ensemble has no queue of its own; its requests wait in its steps' queues. Layout::

    OUT/preprocess/config.pbtxt, 1/model.py, 1/profile.json
    OUT/detector/config.pbtxt,   1/model.onnx (+ target files, below)
    OUT/crop/config.pbtxt,       1/model.py, 1/profile.json
    OUT/classifier/config.pbtxt, 1/model.onnx (+ target files)
    OUT/fusion/config.pbtxt,     1/model.py, 1/profile.json, 1/fusion.json, 1/age_prior.json
    OUT/wff_diagnosis/config.pbtxt, 1/          (the ensemble)

Only the detector and classifier differ between targets:

* ``embedded``: Python backend over ONNX Runtime (model.py + model.onnx + profile.json), CPU.
  Runs on the tritonserver shipped in the nvidia-pytriton wheel.
* ``onnxruntime``: Triton's onnxruntime backend over model.onnx (NGC tritonserver container).
* ``tensorrt``: ``tensorrt_plan`` over model.plan, GPU instances. The plan is built inside the
  NGC container from the model.onnx copied beside it; until then the model does not load.

The Python steps need ``wff`` importable by the backend's Python (installed in the image).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from wff.config import SMALL, Profile, ServingConfig, load_profile
from wff.contracts import Contracts, StepContract, TensorSpec, contracts_for
from wff.ensemble.fusion import FusionSettings, fusion_parameters, load_fusion_settings
from wff.ensemble.pipeline import ARTIFACT_MODELS, check_artifacts
from wff.ensemble.runtime import check_runtime

log = logging.getLogger(__name__)

TARGETS = ("embedded", "onnxruntime", "tensorrt")
PYTHON_STEPS = ("preprocess", "crop", "fusion")  # always Python backend
MODEL_STEPS = ("detector", "classifier")  # the exported networks; their config depends on the target
CONFIG_NAME = "config.pbtxt"
VERSION = "1"
# Ensemble config parameters that identify the served model (DiagnosisClient.model_identity reads them).
MODEL_DIGEST_KEY = "model_digest"  # "sha256:<hex>", model_digest()
WFF_VERSION_KEY = "wff_version"  # the spine-wff version that built the repository
# The adapters' sources, <step>/1/model.py: model_repository/ of the source tree, installed as the
# package data of wff.model_repository.
ADAPTERS_DIR = resources.files("wff.model_repository")  # a Traversable: a folder, or a folder inside a zip


@dataclass(frozen=True)
class Target:
    platform: str  # Triton platform ("" = given by the backend)
    backend: str
    model_file: str  # the file Triton loads, in the version dir
    kind: str  # instance group kind of the detector and classifier


TARGET_SPECS = {
    "embedded": Target("", "python", "model.py", "KIND_CPU"),
    "onnxruntime": Target("onnxruntime_onnx", "onnxruntime", "model.onnx", "KIND_GPU"),
    "tensorrt": Target("tensorrt_plan", "tensorrt", "model.plan", "KIND_GPU"),
}


def _tensor(message, spec: TensorSpec):
    message.name = spec.name
    message.data_type = mc.DataType.Value(spec.data_type)
    message.dims.extend(spec.dims)
    return message


def step_config(
    contract: StepContract,
    *,
    backend: str = "",
    platform: str = "",
    instances: int = 1,
    kind: str = "KIND_CPU",
    preferred_batch: tuple[int, ...] = (),
    max_queue_delay_us: int = 0,
    max_queue_size: int = 0,
    queue_timeout_us: int = 0,
    parameters: dict[str, str] | None = None,
    default_model_filename: str = "",
) -> mc.ModelConfig:
    """One step's config: tensors from the contract; a dynamic batcher whose queue holds at most
    ``max_queue_size`` requests for at most ``queue_timeout_us`` (0: unbounded), rejecting the rest;
    preferred batch sizes and a batching delay when the step batches."""
    cfg = mc.ModelConfig(name=contract.name, platform=platform, backend=backend, max_batch_size=contract.max_batch_size)
    for spec in contract.inputs:
        _tensor(cfg.input.add(), spec)
    for spec in contract.outputs:
        _tensor(cfg.output.add(), spec)
    cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.Kind.Value(kind))
    for name, value in (("serving.max_queue_size", max_queue_size), ("serving.queue_timeout_us", queue_timeout_us)):
        if value < 0:
            raise ValueError(f"{name} is {value}; it must be >= 0 (0 = unbounded)")
    batcher = cfg.dynamic_batching
    batcher.default_queue_policy.CopyFrom(mc.ModelQueuePolicy(
        max_queue_size=max_queue_size, default_timeout_microseconds=queue_timeout_us, timeout_action=mc.ModelQueuePolicy.REJECT))
    if contract.max_batch_size > 0:
        batcher.preferred_batch_size.extend(b for b in preferred_batch if b <= contract.max_batch_size)
        batcher.max_queue_delay_microseconds = max_queue_delay_us
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = value
    if default_model_filename:
        cfg.default_model_filename = default_model_filename
    return cfg


def ensemble_config(contracts: Contracts) -> mc.ModelConfig:
    """The ``wff_diagnosis`` ensemble: its tensors and steps from ``contracts.ensemble`` / ``wiring``."""
    e = contracts.ensemble
    cfg = mc.ModelConfig(name=e.name, platform="ensemble", max_batch_size=e.max_batch_size)
    for spec in e.inputs:
        _tensor(cfg.input.add(), spec)
    for spec in e.outputs:
        _tensor(cfg.output.add(), spec)
    for step, in_map, out_map in contracts.wiring:
        s = cfg.ensemble_scheduling.step.add(model_name=step, model_version=-1)
        s.input_map.update(in_map)
        s.output_map.update(out_map)
    return cfg


def repository_configs(profile: Profile, target: str, settings: FusionSettings, instance_kind: str | None = None) -> dict[str, mc.ModelConfig]:
    """Every model's config for ``target``, keyed by model name."""
    if target not in TARGET_SPECS:
        raise ValueError(f"unknown target {target!r}; expected one of {list(TARGETS)}")
    t = TARGET_SPECS[target]
    c = contracts_for(profile)
    sv = profile.serving
    queue = {"max_queue_size": sv.max_queue_size, "queue_timeout_us": sv.queue_timeout_us}
    python = {"backend": "python", "instances": sv.instances_python, "kind": "KIND_CPU", **queue}
    configs = {
        "preprocess": step_config(c.preprocess, **python),
        "crop": step_config(c.crop, **python),
        "fusion": step_config(c.fusion, **python, parameters=fusion_parameters(settings)),
    }
    batching = {
        "detector": (sv.instances_detector, sv.preferred_batch_detector),
        "classifier": (sv.instances_classifier, sv.preferred_batch_classifier),
    }
    for step, (instances, preferred) in batching.items():
        if target == "embedded":
            check_runtime(sv.runtime, sv.runtime_precision)
            params = {
                "runtime": sv.runtime,
                "runtime_precision": sv.runtime_precision,
                "runtime_threads": str(sv.runtime_threads),
                "runtime_chunk": str(sv.runtime_chunk),
            }
        elif target == "onnxruntime":
            params = {"intra_op_thread_count": str(sv.runtime_threads), "inter_op_thread_count": "1"}
        else:
            params = {}
        configs[step] = step_config(
            c.step(step),
            backend=t.backend,
            platform=t.platform,
            instances=instances,
            kind=instance_kind or t.kind,
            preferred_batch=preferred,
            max_queue_delay_us=sv.max_queue_delay_us,
            **queue,
            parameters=params,
            default_model_filename="" if target == "embedded" else t.model_file,
        )
    configs[c.ensemble.name] = ensemble_config(c)
    return configs


def config_text(cfg: mc.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def read_config(path: str | Path) -> mc.ModelConfig:
    """Parse a config.pbtxt (raises text_format.ParseError with the line on bad text)."""
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())


def model_digest(repository: Path, profile: Profile) -> str:
    """"sha256:<hex>" over what decides a diagnosis in a built repository: the served detector and classifier
    models (every .onnx of their version dirs), the fusion step's fusion.json and
    age_prior.json, and the profile without its serving section (deployment settings, which do not
    change a diagnosis)."""
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(label.encode() + b"\0" + hashlib.sha256(data).digest())

    for step in MODEL_STEPS:
        for path in sorted((repository / step / VERSION).glob("*.onnx")):
            add(f"{step}/{path.name}", path.read_bytes())
    for name in ("fusion.json", "age_prior.json"):
        add(name, (repository / "fusion" / VERSION / name).read_bytes())
    model_sections = {k: v for k, v in profile.to_dict().items() if k != "serving"}
    add("profile", json.dumps(model_sections, sort_keys=True).encode())
    return f"sha256:{digest.hexdigest()}"


def wff_version() -> str:
    """The installed spine-wff version ("unknown" when running from an uninstalled tree)."""
    from importlib import metadata

    try:
        return metadata.version("spine-wff")
    except metadata.PackageNotFoundError:
        return "unknown"


def _adapter(step: str) -> bytes:
    """The source of ``step``'s adapter, model.py."""
    path = ADAPTERS_DIR / step / VERSION / "model.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter source missing from the installed package wff.model_repository; "
                                "reinstall spine-wff (pip install 'spine-wff[serve]', or pip install -e . in a checkout)")
    return path.read_bytes()


def build_repository(
    out: str | Path,
    target: str = "embedded",
    artifacts: str | Path | None = None,
    profile: Profile | None = None,
    instance_kind: str | None = None,
    overwrite: bool = False,
    serving: ServingConfig | None = None,
) -> Path:
    """Write the model repository for ``target`` into ``out`` and return it.

    ``artifacts`` is a ``wff train`` output (profile.json, detector.onnx, classifier.onnx,
    age_prior.json, fusion.json). Without it, only configs and adapters are written for
    ``profile`` (default: small), which is enough to check configs but not to serve.
    ``serving`` replaces the profile's serving section (batching, instances, threads, limits),
    which is deployment, not training: ``wff bench --set serving.KEY=VALUE`` compares variants.
    """
    if target not in TARGET_SPECS:
        raise ValueError(f"unknown target {target!r}; expected one of {list(TARGETS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True (--force) or choose an empty folder")
        shutil.rmtree(out)
    if artifacts is not None:
        artifacts = Path(artifacts)
        check_artifacts(artifacts)
        profile = load_profile(artifacts / "profile.json")
        settings = load_fusion_settings(artifacts / "fusion.json")
    else:
        profile = profile or SMALL
        settings = FusionSettings(profile.fusion.strategy, profile.fusion.det_threshold)
        log.warning("no artifacts given: %s gets configs and adapters only (no models, not servable)", out)
    if serving is not None:
        profile = profile.replace(serving=serving)
    allowed = {float(profile.fusion.det_threshold), *(float(t) for t in profile.fusion.det_threshold_grid)}
    if float(settings.det_threshold) not in allowed:
        raise ValueError(
            f"fusion.json det_threshold {settings.det_threshold} is neither profile.json fusion.det_threshold "
            f"{profile.fusion.det_threshold} (used by crop) nor one of fusion.det_threshold_grid "
            f"{list(profile.fusion.det_threshold_grid)} (what cross-validation chooses from); retrain or fix one of them"
        )
    configs = repository_configs(profile, target, settings, instance_kind)
    for name, cfg in configs.items():
        version = out / name / VERSION
        version.mkdir(parents=True, exist_ok=True)
        (out / name / CONFIG_NAME).write_text(config_text(cfg))
        python_step = name in PYTHON_STEPS or (name in MODEL_STEPS and target == "embedded")
        if python_step:
            (version / "model.py").write_bytes(_adapter(name))
            profile.save(version / "profile.json")
        if artifacts is None:
            continue
        if name in MODEL_STEPS:
            shutil.copy2(artifacts / ARTIFACT_MODELS[name], version / "model.onnx")
        if name == "fusion":
            shutil.copy2(artifacts / "fusion.json", version / "fusion.json")
            shutil.copy2(artifacts / "age_prior.json", version / "age_prior.json")
    if artifacts is not None:  # the served model's identity, over the files copied above
        ensemble = configs[contracts_for(profile).ensemble.name]
        ensemble.parameters[MODEL_DIGEST_KEY].string_value = model_digest(out, profile)
        ensemble.parameters[WFF_VERSION_KEY].string_value = wff_version()
        (out / ensemble.name / CONFIG_NAME).write_text(config_text(ensemble))
    log.info("wrote %s repository for profile %r to %s", target, profile.name, out)
    return out
