"""gRPC client of the ``wff_diagnosis`` ensemble: one request = one patient's DICOM files.

    client = DiagnosisClient("localhost:8001")
    dx = client.diagnose(read_patient_files("data/P0001"), age=63)
    dx.label, dx.p_malignant, dx.components()

Tensor names and dtypes come from ``wff.contracts``; outputs are parsed into
:class:`wff.ensemble.diagnosis.Diagnosis`, the same type the in-process pipeline returns.
Failures raise :class:`DiagnosisError` (or its subclasses) carrying the server's message, with
``DICOM_FILES[i]`` in that message followed by the client's own name for file i.

Every call answered UNAVAILABLE (a server that sheds load because a step's queue is full or a
request waited past the queue timeout, one that is restarting, or none listening yet) is tried
again after a pause that doubles each time (with jitter, so a shed burst does not come back at
once), at most ``retries`` times and never past ``timeout_s`` from the first attempt; the final
error says how many attempts were made. Other errors (INVALID_ARGUMENT above all) are final.

TLS: ``tls_ca`` (PEM roots the server's certificate must chain to), ``tls_cert`` + ``tls_key``
(the client's certificate for servers that require mutual TLS); giving any of them, or
``ssl=True`` (the system's roots), turns TLS on. A patient whose files exceed ``max_bytes``
(default: ``serving.max_bytes``) is refused before anything is sent, and the gRPC channel's
message limits are derived from the same number.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import InferenceServerException

from wff.config import SMALL, ServingConfig
from wff.contracts import ENSEMBLE_NAME, contracts_for
from wff.ensemble.diagnosis import Diagnosis
from wff.ensemble.fusion import FusionSettings, settings_from_parameters

# Names and dtypes of the ensemble's tensors do not depend on the profile (only dims do).
ENSEMBLE = contracts_for(SMALL).ensemble
FILES_INPUT, AGE_INPUT = (spec.name for spec in ENSEMBLE.inputs)
FUSION_MODEL = contracts_for(SMALL).fusion.name
DETECTOR_MODEL = contracts_for(SMALL).detector.name
MODEL_DIGEST_KEY, WFF_VERSION_KEY = "model_digest", "wff_version"  # ensemble config parameters (wff.serving.repository)
SKIPPED_SUFFIXES = (".json", ".csv")  # annotations and labels in a dataset folder, never sent
DEFAULT_TIMEOUT_S = 120.0  # seconds for one call, its retries included
DEFAULT_RETRIES = 3  # further attempts after an UNAVAILABLE answer
RETRY_PAUSE_S = 0.25  # pause before the first retry; it doubles for each further one
MAX_RETRY_PAUSE_S = 2.0  # longest pause between two attempts
MIN_ATTEMPT_S = 0.5  # no retry is started with less time than this left before the deadline
DEFAULT_MAX_BYTES = ServingConfig().max_bytes  # largest patient sent, in file bytes (the server's default limit)
GRPC_FRAMING_BYTES = 1024 * 1024  # room in one gRPC message beyond the file bytes: tensor names, 4-byte lengths, the age
MIB = 1024 * 1024
_FILE_REF = re.compile(re.escape(FILES_INPUT) + r"\[(\d+)\]")
_DEAD_STUB = re.compile(r"Stub process '([^']+)' is not healthy")  # Triton's python backend, 2.51
_SHED = re.compile(r"Exceeds maximum queue size|Request timeout expired")  # Triton's queue policy rejections


class DiagnosisError(RuntimeError):
    """The server did not return a diagnosis. ``status`` is the gRPC status name, e.g. INVALID_ARGUMENT;
    ``attempts`` the number of times the call was sent; ``reason`` names the kind of failure in summaries."""

    reason = "server error"

    def __init__(self, message: str, status: str | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts


class RejectedInput(DiagnosisError):
    """The server rejected the request's content (bad DICOM, no usable series, age out of range)."""

    reason = "input rejected by the server"


class RequestTooLarge(DiagnosisError):
    """The patient's files exceed the client's byte limit; nothing was sent."""

    reason = "too large to send"


class ServerUnavailable(DiagnosisError):
    """No server answered at the URL (refused, unreachable, TLS handshake failed, or the deadline passed)."""

    reason = "no answer from the server"


class ServerBusy(ServerUnavailable):
    """The server shed the request: a step's queue was full, or the request waited past the queue timeout."""

    reason = "server overloaded"


class BackendDown(DiagnosisError):
    """A backend process of the server died while the request needed it; retrying later may succeed."""

    reason = "server backend died"


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
    if status == "UNAVAILABLE" and _SHED.search(message):
        return ServerBusy(f"the server is overloaded and shed the request: {message} (send fewer requests at once, "
                          "or give the server more instances or longer queues: serving.instances_*, serving.max_queue_size, "
                          "serving.queue_timeout_us)", status)
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
    try:
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        return settings_from_parameters(params)
    except (KeyError, ValueError) as e:
        raise DiagnosisError(f"the {FUSION_MODEL} model config's fusion parameters are unusable ({e}); "
                             "rebuild the repository with wff repo build") from e


@dataclass(frozen=True)
class ModelIdentity:
    """What identifies the served model in results (wff.pacs.results): read from the model configs."""

    name: str  # the ensemble's name
    version: str  # spine-wff version that built the repository
    digest: str  # "sha256:<hex>" over the served models, fusion settings, age prior and profile (wff repo build)
    image_size: int  # side of the detector input in pixels (the letterbox size)


def identity_from_configs(ensemble: dict, detector: dict) -> ModelIdentity:
    """ModelIdentity from the ensemble's and the detector's model configs (JSON, as tritonclient returns them)."""
    params = {k: v.get("string_value", "") for k, v in ensemble.get("parameters", {}).items()}
    name = ensemble.get("name", ENSEMBLE_NAME)
    if not params.get(MODEL_DIGEST_KEY, "").startswith("sha256:"):
        raise DiagnosisError(f"the served {name} config has no {MODEL_DIGEST_KEY} parameter; rebuild the repository "
                             "with wff repo build (it writes the digest of the models it copies)")
    try:
        size = int(detector["input"][0]["dims"][-1])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise DiagnosisError(f"the {DETECTOR_MODEL} model config has no input dims ({e!r}); rebuild the repository "
                             "with wff repo build") from e
    return ModelIdentity(name, params.get(WFF_VERSION_KEY) or "unknown", params[MODEL_DIGEST_KEY], size)


def message_limit(max_bytes: int) -> int:
    """The gRPC message size (send and receive) of a request whose files total ``max_bytes``."""
    return max_bytes + GRPC_FRAMING_BYTES


def channel_kwargs(
    ssl: bool = False,
    tls_ca: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict:
    """Keyword arguments of tritonclient's InferenceServerClient (blocking and asyncio alike): TLS when ``ssl``
    or any PEM file is given; message limits from ``max_bytes``; tritonclient's keep-alive defaults."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs its private key: give both tls_cert and tls_key (--tls-cert, --tls-key)")
    for what, path in (("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{what} {path}: no such PEM file")
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    keepalive = grpcclient.KeepAliveOptions()
    limit = message_limit(max_bytes)
    return {
        "ssl": ssl or any(p is not None for p in (tls_ca, tls_cert, tls_key)),
        "root_certificates": None if tls_ca is None else str(tls_ca),
        "certificate_chain": None if tls_cert is None else str(tls_cert),
        "private_key": None if tls_key is None else str(tls_key),
        "channel_args": [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ],
    }


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n} bytes"


def check_request_size(files: Sequence[tuple[str, bytes]], max_bytes: int) -> None:
    """Refuse (RequestTooLarge) files that together exceed ``max_bytes``, before anything is sent."""
    total = sum(len(data) for _, data in files)
    if total > max_bytes:
        name, data = max(files, key=lambda f: len(f[1]))
        raise RequestTooLarge(
            f"not sent: the patient's {len(files)} file(s) total {_size(total)}, beyond the limit of {_size(max_bytes)} per patient "
            f"(largest: {name}, {_size(len(data))}); the server refuses more than its serving.max_bytes: raise --max-bytes "
            "only if that is higher"
        )


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before sending a call again that was answered UNAVAILABLE."""

    retries: int = DEFAULT_RETRIES  # further attempts after the first
    pause_s: float = RETRY_PAUSE_S  # before the first retry; doubles for each further one
    max_pause_s: float = MAX_RETRY_PAUSE_S

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")

    def pause(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based): half the doubled step, plus up to as much again at random."""
        step = min(self.max_pause_s, self.pause_s * 2 ** (attempt - 1))
        return step / 2 + random.random() * step / 2


class Attempts:
    """One call's attempts: the time left for the next one, and whether an error is worth another.
    ``files`` are the request's (name, bytes), for naming them in errors."""

    def __init__(self, policy: RetryPolicy, timeout_s: float, files: Sequence[tuple[str, bytes]] = ()) -> None:
        self.policy = policy
        self.timeout_s = timeout_s
        self.files = files
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s
        self.count = 0

    def next_timeout(self) -> float:
        """Counts an attempt; its client timeout is what is left of the call's."""
        self.count += 1
        return max(self.deadline - time.monotonic(), 0.0)

    def after_failure(self, e: InferenceServerException) -> float:
        """Seconds to wait before the next attempt; raises the final DiagnosisError when there is none."""
        error = translate_error(e, self.files, self.timeout_s)
        pause = self.pause_before_retry(error)
        if pause is None:
            raise self.final(error) from e
        return pause

    def pause_before_retry(self, error: DiagnosisError) -> float | None:
        """Seconds to wait before the next attempt, or None when ``error`` is final."""
        if error.status != "UNAVAILABLE" or self.count > self.policy.retries:
            return None
        pause = self.policy.pause(self.count)
        return pause if time.monotonic() + pause + MIN_ATTEMPT_S <= self.deadline else None

    def final(self, error: DiagnosisError) -> DiagnosisError:
        """``error`` as raised to the caller: a retryable one says how many attempts were made, in how long."""
        if error.status != "UNAVAILABLE":
            return error
        took = time.monotonic() - self.started
        plural = "s" if self.count > 1 else ""
        return type(error)(f"{error} [{self.count} attempt{plural} in {took:.1f} s]", error.status, self.count)


class _Client:
    """What both clients share: settings, retry policy and the tritonclient channel (``transport`` module's)."""

    transport = grpcclient

    def __init__(
        self,
        url: str = "localhost:8001",
        *,
        ssl: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        model_name: str = ENSEMBLE_NAME,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.retry = RetryPolicy(retries)
        self.max_bytes = max_bytes
        self.model_name = model_name
        kwargs = channel_kwargs(ssl, tls_ca, tls_cert, tls_key, max_bytes)
        try:
            self._client = self.transport.InferenceServerClient(url, **kwargs)
        except InferenceServerException as e:
            raise translate_error(e) from e


class DiagnosisClient(_Client):
    """Blocking client; ``url`` is host:port of tritonserver's gRPC endpoint (module docstring: retries, TLS, limits)."""

    def _call(self, call, files: Sequence[tuple[str, bytes]] = ()):
        """``call(client_timeout)``, sent again on UNAVAILABLE as ``self.retry`` allows."""
        attempts = Attempts(self.retry, self.timeout_s, files)
        while True:
            try:
                return call(attempts.next_timeout())
            except InferenceServerException as e:
                pause = attempts.after_failure(e)
            time.sleep(pause)

    def diagnose(self, files: Sequence[tuple[str, bytes]], age: float | None = None) -> Diagnosis:
        """One patient's files as (name, bytes) and optional age in years -> its diagnosis."""
        check_request_size(files, self.max_bytes)
        inputs, outputs = build_inputs(files, age), requested_outputs()
        result = self._call(lambda t: self._client.infer(self.model_name, inputs, outputs=outputs, client_timeout=t), files)
        return parse_result(result)

    def model_config(self, model: str) -> dict:
        """``model``'s config as JSON (tritonclient's as_json form)."""
        return self._call(lambda t: self._client.get_model_config(model, as_json=True, client_timeout=t))["config"]

    def fusion_settings(self) -> FusionSettings:
        return settings_from_config(self.model_config(FUSION_MODEL))

    def model_identity(self) -> ModelIdentity:
        """The served model's name, version, digest and detector input size, for results."""
        return identity_from_configs(self.model_config(self.model_name), self.model_config(DETECTOR_MODEL))

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


class AsyncDiagnosisClient(_Client):
    """asyncio client (tritonclient.grpc.aio) for many patients in flight; use inside ``async with``.
    Same keyword arguments as :class:`DiagnosisClient`."""

    transport = grpcclient_aio

    async def _call(self, call, files: Sequence[tuple[str, bytes]] = ()):
        """``await call(client_timeout)``, sent again on UNAVAILABLE as ``self.retry`` allows."""
        attempts = Attempts(self.retry, self.timeout_s, files)
        while True:
            try:
                return await call(attempts.next_timeout())
            except InferenceServerException as e:
                pause = attempts.after_failure(e)
            await asyncio.sleep(pause)

    async def diagnose(self, files: Sequence[tuple[str, bytes]], age: float | None = None) -> Diagnosis:
        check_request_size(files, self.max_bytes)
        inputs, outputs = build_inputs(files, age, grpcclient_aio), requested_outputs(grpcclient_aio)
        result = await self._call(lambda t: self._client.infer(self.model_name, inputs, outputs=outputs, client_timeout=t), files)
        return parse_result(result)

    async def fusion_settings(self) -> FusionSettings:
        config = (await self._call(lambda t: self._client.get_model_config(FUSION_MODEL, as_json=True, client_timeout=t)))["config"]
        return settings_from_config(config)

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "AsyncDiagnosisClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
