"""preprocess: one patient's DICOM files + optional age -> detector-ready slices (wff.ensemble.steps.preprocess).

The request carries no file names, so files are named by their position, ``DICOM_FILES[i]``,
in error messages and notes; the client maps them back to its own file names.
"""

import numpy as np

from wff.config import load_profile
from wff.ensemble import steps
from wff.ensemble.types import InputError
from wff.serving.triton_step import TritonStep


def request_files(dicom: np.ndarray) -> list[tuple[str, bytes]]:
    """DICOM_FILES (n,) BYTES -> [(name, Part 10 bytes)]."""
    if dicom.ndim != 1 or dicom.size == 0:
        raise InputError(f"DICOM_FILES must be a non-empty 1-D list of files, got shape {dicom.shape}")
    return [(f"DICOM_FILES[{i}]", bytes(v)) for i, v in enumerate(dicom)]


class TritonPythonModel(TritonStep):
    def setup(self) -> None:
        self.profile = load_profile(self.version_dir / "profile.json")

    def run(self, inputs):
        files = request_files(inputs["preprocess_dicom"])
        age = steps.request_age(inputs["preprocess_age"], self.profile.age.max_age)
        return steps.preprocess(files, age, self.profile)
