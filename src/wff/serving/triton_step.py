"""The base of every Python-backend adapter in model_repository/<step>/1/model.py.

An adapter subclasses :class:`TritonStep`, builds its state in ``setup()`` and maps
contract-named numpy inputs to contract-named outputs in ``run(inputs)``. This class does the
Triton side once:

* ``initialize`` parses ``args["model_config"]`` once: output dtypes via
  ``pb_utils.triton_string_to_numpy``, string ``parameters``, the version directory
  (``args["model_repository"]/args["model_version"]``, where profile.json and the model files are);
* ``execute`` returns exactly one response per request. A non-batching step runs one request
  (one patient) at a time. A batching step (``max_batch_size > 0``: detector, classifier)
  concatenates every request's batch into one ``run`` call and splits the outputs back;
* errors stay with their request: ``InputError`` (the client's input is unusable) ->
  ``INVALID_ARG`` with the message; anything else, a plain ``ValueError`` included (a bug or a
  broken model file, not the client's fault) -> ``INTERNAL`` with the traceback logged. If a
  merged batch fails, each request is rerun alone so only the bad one fails;
* custom counters (wff.serving.custom_metrics): every INVALID_ARG answer counts in
  ``wff_rejected_inputs_total{model, reason}``; steps count their own with ``count()``.
  Python backends without custom-metric support (before Triton 23.05) count nothing.

Logs carry model names, counts and error messages, never pixel data or patient identifiers.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from wff.ensemble.types import InputError
from wff.serving.custom_metrics import COUNTERS, rejection_reason

Arrays = Mapping[str, np.ndarray]


class TritonStep:
    """Subclass and implement ``setup()`` (optional) and ``run(inputs) -> outputs``."""

    def initialize(self, args: dict) -> None:
        self.model_config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        self.version_dir = Path(args["model_repository"]) / args["model_version"]
        self.parameters = {k: v["string_value"] for k, v in self.model_config.get("parameters", {}).items()}
        self.batching = self.model_config.get("max_batch_size", 0) > 0
        self.input_names = [i["name"] for i in self.model_config["input"]]
        self.output_dtypes = {
            o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in self.model_config["output"]
        }
        self._families: dict = {}  # counter name -> MetricFamily; kept alive as long as its metrics
        self._counters: dict = {}  # (name, labels) -> Metric
        self.setup()
        pb_utils.Logger.log_info(f"{self.model_name}: ready (version dir {self.version_dir.name}, batching={self.batching})")

    def setup(self) -> None:
        """Build expensive state (sessions, settings) from ``self.version_dir`` / ``self.parameters``."""

    def run(self, inputs: Arrays) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def parameter(self, key: str, default: str) -> str:
        return self.parameters.get(key) or default

    def count(self, name: str, **labels: str) -> None:
        """Add 1 to the custom counter ``name`` (a key of COUNTERS) with these labels."""
        if not hasattr(pb_utils, "MetricFamily"):
            return
        key = (name, tuple(sorted(labels.items())))
        metric = self._counters.get(key)
        if metric is None:
            if name not in self._families:
                self._families[name] = pb_utils.MetricFamily(name=name, description=COUNTERS[name], kind=pb_utils.MetricFamily.COUNTER)
            metric = self._counters[key] = self._families[name].Metric(labels=dict(labels))
        metric.increment(1)

    def execute(self, requests: list) -> list:
        if self.batching and len(requests) > 1:
            return self._execute_merged(requests)
        return [self._respond(self._inputs(r)) for r in requests]

    def _inputs(self, request) -> dict[str, np.ndarray | None]:
        """Contract-named numpy inputs of one request; an absent optional input is None."""
        tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in self.input_names}
        return {name: None if t is None else t.as_numpy() for name, t in tensors.items()}

    def _respond(self, inputs: dict) -> object:
        return self._guarded(lambda: self._wrap(self.run(inputs)))

    def _guarded(self, make_response) -> object:
        """``make_response()``, or the error response for what it raised."""
        try:
            return make_response()
        except InputError as e:
            self.count("wff_rejected_inputs_total", model=self.model_name, reason=rejection_reason(str(e)))
            return self._error(str(e), pb_utils.TritonError.INVALID_ARG)
        except Exception as e:  # a bug, not the client's fault: log it, answer INTERNAL, keep serving
            pb_utils.Logger.log_error(f"{self.model_name}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            return self._error(f"{self.model_name}: internal error ({type(e).__name__}); see the server log", pb_utils.TritonError.INTERNAL)

    def _execute_merged(self, requests: list) -> list:
        """One ``run`` over the concatenated batches of all requests, split back along dim 0.

        If the merged call fails, every request is rerun alone, so the error goes only to the
        request that caused it.
        """
        per_request = [self._inputs(r) for r in requests]
        try:
            merged = {name: np.concatenate([inp[name] for inp in per_request]) for name in self.input_names}
            outputs = self.run(merged)
        except Exception as e:
            pb_utils.Logger.log_warn(f"{self.model_name}: merged batch of {len(requests)} requests failed ({type(e).__name__}); rerunning one by one")
            return [self._respond(inp) for inp in per_request]
        bounds = np.cumsum([len(inp[self.input_names[0]]) for inp in per_request])[:-1]
        parts = {name: np.split(np.asarray(array), bounds) for name, array in outputs.items()}
        return [self._guarded(lambda i=i: self._wrap({n: p[i] for n, p in parts.items()})) for i in range(len(requests))]

    def _wrap(self, outputs: Arrays) -> object:
        missing = sorted(set(self.output_dtypes) - set(outputs))
        if missing:
            raise RuntimeError(f"{self.model_name}: run() returned no {missing}")
        tensors = [pb_utils.Tensor(name, np.asarray(outputs[name], dtype)) for name, dtype in self.output_dtypes.items()]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _error(self, message: str, code) -> object:
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))

    def finalize(self) -> None:
        self._counters.clear()  # metrics before their families, as the backend requires
        self._families.clear()
        pb_utils.Logger.log_info(f"{self.model_name}: unloaded")
