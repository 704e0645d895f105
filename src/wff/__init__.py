"""spine-wff: weighted fusion framework for spinal tumour diagnosis, served by Triton."""
