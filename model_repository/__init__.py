"""The Triton adapters, ``<step>/1/model.py``: package data that ``wff repo build`` copies into a repository
(wff.serving.repository). Not imported by the adapters themselves, which run inside tritonserver."""
