"""The JSON documents recnext prints and writes: each names its schema and version; metrics share one unit."""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from recnext_cli.errors import IntegrityError

# Schema name -> version. A version goes up whenever a key is renamed or removed or a unit changes; adding keys does
# not change it. README "JSON outputs" documents each schema.
SCHEMAS = MappingProxyType({
    "list": 1,
    "results": 1,
    "test-result": 1,
    "infer": 1,
    "cache": 1,
    "verify": 1,
    "doctor": 1,
    "bench": 1,
})
# The one unit convention of every schema: COCO AP as a fraction in [0, 1] under mmdet's own metric names, as
# mmdet's evaluate() returns them (bbox_mAP, bbox_mAP_50, ..., segm_mAP_75); durations in milliseconds under `*_ms`.


def document(schema: str, **fields: Any) -> dict[str, Any]:
    """A JSON object of `schema` at its current version, with `fields` after the two header keys."""
    return {"schema": f"recnext.{schema}", "schema_version": SCHEMAS[schema], **fields}


def dumps(payload: Mapping[str, Any]) -> str:
    return json.dumps(payload, indent=2)


def check_version(payload: Mapping[str, Any], schema: str, path: Path) -> None:
    """Refuse a document of another schema or written by a newer recnext; documents from before versioning pass."""
    name, version = payload.get("schema"), payload.get("schema_version")
    if name is not None and name != f"recnext.{schema}":
        raise IntegrityError(f"{path} is a {name!r} document, not a recnext.{schema} one")
    if version is None:
        return
    if type(version) is not int or version < 1:
        raise IntegrityError(f"{path}: schema_version {version!r} is not a positive whole number")
    if version > SCHEMAS[schema]:
        raise IntegrityError(
            f"{path} has recnext.{schema} schema version {version}, newer than the {SCHEMAS[schema]} this recnext "
            "reads; upgrade recnext (pip install -U recnext)"
        )
