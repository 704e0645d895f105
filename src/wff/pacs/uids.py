"""Deterministic UIDs of the result objects, under a configurable UID root.

A result's UIDs are a hash of what it was made from: the object kind ("sr-series",
"sr-instance", "pr-series", "pr-instance", ...), the StudyInstanceUID, the sorted SOP Instance
UIDs of the diagnosed instances, the model version and the model digest. Sending the same study
again gives the same UIDs (a PACS then replaces or ignores the copy instead of keeping two
results); one more instance, or another model, gives new ones.

UID form (PS3.5 9.1): ``<root>.<digits>``, at most 64 characters, digits and dots only, no
component with a leading zero. The digits are the decimal form of a SHA-256 hash, cut to the
room the root leaves (at least ``MIN_HASH_DIGITS``).

The default root, ``DEFAULT_UID_ROOT``, is pydicom's root (``pydicom.uid.PYDICOM_ROOT_UID``,
registered by pydicom for generated UIDs) followed by the first 12 digits of
``pydicom.uid.generate_uid(entropy_srcs=["spine-wff"])``'s suffix. A hospital that has its own
root (an ISO OID arc) sets it in the gateway settings (``uid_root``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.8.498.885933533669"
MAX_UID_CHARS = 64  # PS3.5 9.1
MIN_HASH_DIGITS = 20  # about 66 bits of the hash survive the cut; the root may be at most 64 - 21 characters
MAX_ROOT_CHARS = MAX_UID_CHARS - MIN_HASH_DIGITS - 1
_ROOT = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def check_uid_root(root: str) -> str:
    """``root`` if it can prefix the derived UIDs; ValueError saying what is wrong otherwise."""
    if not isinstance(root, str) or not _ROOT.fullmatch(root):
        raise ValueError(f"UID root {root!r} is not a UID: digits and dots only, no empty component, no leading zeros "
                         f"(e.g. {DEFAULT_UID_ROOT}); give the root without a trailing dot")
    if len(root) > MAX_ROOT_CHARS:
        raise ValueError(f"UID root {root!r} has {len(root)} characters; at most {MAX_ROOT_CHARS} leave room for the "
                         f"{MIN_HASH_DIGITS} hash digits of a 64-character UID")
    return root


def derived_uid(root: str, *parts: str) -> str:
    """``root`` + "." + the digits of SHA-256 over ``parts`` (in order), as long as 64 characters allow."""
    check_uid_root(root)
    digest = hashlib.sha256(json.dumps([root, *parts], separators=(",", ":")).encode()).hexdigest()
    digits = str(int(digest, 16))  # a decimal without leading zeros
    return f"{root}.{digits[: MAX_UID_CHARS - len(root) - 1]}"


def is_own_uid(uid: str, root: str) -> bool:
    """Whether ``uid`` lies under ``root`` (the gateway's own objects are never input)."""
    return str(uid).startswith(root + ".")


@dataclass(frozen=True)
class ResultUIDs:
    """The UIDs of one result: the SR and the presentation state, each in its own series."""

    sr_series: str
    sr_instance: str
    pr_series: str
    pr_instance: str
    device: str  # the algorithm as a device observer: same for every study


def input_key(study_uid: str, sop_instance_uids: Iterable[str], model_version: str, model_digest: str) -> list[str]:
    """What a result is derived from, in a fixed order: study, sorted instances, model."""
    sops = sorted({str(uid) for uid in sop_instance_uids})
    if not sops:
        raise ValueError("no SOP Instance UIDs: a result is derived from the instances it diagnosed")
    return [str(study_uid), *sops, str(model_version), str(model_digest)]


def result_uids(root: str, study_uid: str, sop_instance_uids: Iterable[str], model_version: str, model_digest: str) -> ResultUIDs:
    """The UIDs of the result of diagnosing ``sop_instance_uids`` of ``study_uid`` with the model
    (``model_version``, ``model_digest``)."""
    key = input_key(study_uid, sop_instance_uids, model_version, model_digest)
    return ResultUIDs(
        sr_series=derived_uid(root, "sr-series", *key),
        sr_instance=derived_uid(root, "sr-instance", *key),
        pr_series=derived_uid(root, "pr-series", *key),
        pr_instance=derived_uid(root, "pr-instance", *key),
        device=derived_uid(root, "device", str(model_version), str(model_digest)),
    )
