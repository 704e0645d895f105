"""Stand-ins for TensorRT shared by the test_trt*.py files."""

from __future__ import annotations

import numpy as np


class FakeEngine:
    """Stands in for a TensorRT plan: ONNX Runtime's outputs, perturbed; records its feeds and batch sizes."""

    def __init__(self, reference, shift=0.0):
        self.reference, self.shift, self.batches, self.feeds = reference, shift, [], []

    def run(self, feeds):
        self.feeds.append(dict(feeds))
        self.batches.append(len(next(iter(feeds.values()))))
        out = self.reference.run(feeds)
        return {k: v + np.asarray(self.shift, v.dtype) if v.dtype == np.float32 else v for k, v in out.items()}
