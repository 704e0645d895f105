"""``wff pacs``: the DICOM gateway between a PACS and the diagnosis server (receive, diagnose, send results back)."""
