"""The published JSON Schema of the experiment spec, for editors and clients."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from shared.spec_io import spec_json_schema

router = APIRouter(prefix="/v1/spec", tags=["spec"])


@router.get("/schema")
def get_spec_schema() -> dict[str, Any]:
    """JSON Schema of spec v1 (keys spelled as users write them, e.g. ``from``)."""
    return spec_json_schema()
