"""gRPC client of the ``wff_diagnosis`` ensemble: one request = one patient's DICOM files.

    client = DiagnosisClient("localhost:8001")
    dx = client.diagnose(read_patient_files("data/P0001"), age=63)
    dx.label, dx.p_malignant, dx.components()

Tensor names and dtypes come from ``wff.contracts``; outputs are parsed into
:class:`wff.ensemble.diagnosis.Diagnosis`, the same type the in-process pipeline returns.
Failures raise :class:`DiagnosisError` (or its subclasses) carrying the server's message, with
``DICOM_FILES[i]`` in that message followed by the client's own name for file i.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import InferenceServerException

from wff.config import SMALL
from wff.contracts import ENSEMBLE_NAME, contracts_for
from wff.ensemble.diagnosis import Diagnosis
from wff.ensemble.fusion import FusionSettings

# Names and dtypes of the ensemble's tensors do not depend on the profile (only dims do).
ENSEMBLE = contracts_for(SMALL).ensemble
FILES_INPUT, AGE_INPUT = (spec.name for spec in ENSEMBLE.inputs)
FUSION_MODEL = contracts_for(SMALL).fusion.name
SKIPPED_SUFFIXES = (".json", ".csv")  # annotations and labels in a dataset folder, never sent
DEFAULT_TIMEOUT_S = 120.0
_FILE_REF = re.compile(re.escape(FILES_INPUT) + r"\[(\d+)\]")
_DEAD_STUB = re.compile(r"Stub process '([^']+)' is not healthy")  # Triton's python backend, 2.51


class DiagnosisError(RuntimeError):
    """The server did not return a diagnosis. ``status`` is the gRPC status name, e.g. INVALID_ARGUMENT."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


class RejectedInput(DiagnosisError):
    """The server rejected the request's content (bad DICOM, no usable series, age out of range)."""


class ServerUnavailable(DiagnosisError):
    """No server answered at the URL (refused, unreachable, or the deadline passed)."""


class BackendDown(DiagnosisError):
    """A backend process of the server died while the request needed it; retrying later may succeed."""


def read_patient_files(patient_dir: str | Path) -> list[tuple[str, bytes]]:
    """Every file under ``patient_dir`` except .json/.csv, as (path relative to it, bytes), sorted by path."""
    root = Path(patient_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder of DICOM files")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() not in SKIPPED_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{root}: no files to send (.json and .csv are skipped)")
    return [(p.relative_to(root).as_posix(), p.read_bytes()) for p in paths]


def build_inputs(files: Sequence[tuple[str, bytes]], age: float | None, module=grpcclient) -> list:
    """The ensemble's input tensors: DICOM_FILES (n,) BYTES, AGE_YEARS (0,) or (1,) FP32."""
    if not files:
        raise ValueError("no files to send")
    data = np.array([content for _, content in files], dtype=np.object_)
    ages = np.zeros((0,), np.float32) if age is None else np.array([age], np.float32)
    tensors = []
    for spec, value in zip(ENSEMBLE.inputs, (data, ages)):
        tensor = module.InferInput(spec.name, list(value.shape), spec.wire_dtype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def requested_outputs(module=grpcclient) -> list:
    return [module.InferRequestedOutput(spec.name) for spec in ENSEMBLE.outputs]


def parse_result(result) -> Diagnosis:
    return Diagnosis.from_outputs({spec.name: result.as_numpy(spec.name) for spec in ENSEMBLE.outputs})


def translate_error(e: InferenceServerException, files: Sequence[tuple[str, bytes]] = (), timeout_s: float | None = None) -> DiagnosisError:
    """A tritonclient exception as a DiagnosisError, file positions annotated with the client's names."""
    status = (e.status() or "").removeprefix("StatusCode.") or None
    message = e.message() or str(e)
    names = [name for name, _ in files]
    message = _FILE_REF.sub(lambda m: f"{m.group(0)} ({names[int(m.group(1))]})" if int(m.group(1)) < len(names) else m.group(0), message)
    if status == "INVALID_ARGUMENT":
        return RejectedInput(f"rejected by the server: {message}", status)
    if status == "UNAVAILABLE":
        return ServerUnavailable(f"no server answered: {message}", status)
    if status == "DEADLINE_EXCEEDED":
        return ServerUnavailable(f"no answer within {timeout_s} s (raise --timeout for big studies)", status)
    dead = _DEAD_STUB.search(message)
    if dead:
        return BackendDown(
            f"server error ({status}): the backend process {dead.group(1)!r} of the server has died; no diagnosis was made. "
            "wff serve reloads the model within seconds: send the request again (if it keeps failing, restart the server)",
            status,
        )
    return DiagnosisError(f"server error ({status or 'unknown status'}): {message}", status)


def settings_from_config(config: dict) -> FusionSettings:
    """Fusion weights and threshold from the fusion model's config (written by wff repo build)."""
    from wff.serving.repository import settings_from_parameters

    try:
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        return settings_from_parameters(params)
    except (KeyError, ValueError) as e:
        raise DiagnosisError(f"the {FUSION_MODEL} model config's fusion parameters are unusable ({e}); "
                             "rebuild the repository with wff repo build") from e


class DiagnosisClient:
    """Blocking client; ``url`` is host:port of tritonserver's gRPC endpoint."""

    def __init__(
        self,
        url: str = "localhost:8001",
        ssl: bool = False,
        root_certificates: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        model_name: str = ENSEMBLE_NAME,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.model_name = model_name
        try:
            self._client = grpcclient.InferenceServerClient(url, ssl=ssl, root_certificates=root_certificates)
        except InferenceServerException as e:
            raise translate_error(e) from e

    def diagnose(self, files: Sequence[tuple[str, bytes]], age: float | None = None) -> Diagnosis:
        """One patient's files as (name, bytes) and optional age in years -> its diagnosis."""
        try:
            result = self._client.infer(
                self.model_name, build_inputs(files, age), outputs=requested_outputs(), client_timeout=self.timeout_s
            )
        except InferenceServerException as e:
            raise translate_error(e, files, self.timeout_s) from e
        return parse_result(result)

    def fusion_settings(self) -> FusionSettings:
        try:
            config = self._client.get_model_config(FUSION_MODEL, as_json=True, client_timeout=self.timeout_s)["config"]
        except InferenceServerException as e:
            raise translate_error(e, timeout_s=self.timeout_s) from e
        return settings_from_config(config)

    def is_ready(self) -> bool:
        try:
            return self._client.is_model_ready(self.model_name, client_timeout=self.timeout_s)
        except InferenceServerException:
            return False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "DiagnosisClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncDiagnosisClient:
    """asyncio client (tritonclient.grpc.aio) for many patients in flight; use inside ``async with``."""

    def __init__(
        self,
        url: str = "localhost:8001",
        ssl: bool = False,
        root_certificates: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        model_name: str = ENSEMBLE_NAME,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.model_name = model_name
        self._client = grpcclient_aio.InferenceServerClient(url, ssl=ssl, root_certificates=root_certificates)

    async def diagnose(self, files: Sequence[tuple[str, bytes]], age: float | None = None) -> Diagnosis:
        try:
            result = await self._client.infer(
                self.model_name,
                build_inputs(files, age, grpcclient_aio),
                outputs=requested_outputs(grpcclient_aio),
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as e:
            raise translate_error(e, files, self.timeout_s) from e
        return parse_result(result)

    async def fusion_settings(self) -> FusionSettings:
        try:
            config = (await self._client.get_model_config(FUSION_MODEL, as_json=True, client_timeout=self.timeout_s))["config"]
        except InferenceServerException as e:
            raise translate_error(e, timeout_s=self.timeout_s) from e
        return settings_from_config(config)

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "AsyncDiagnosisClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
