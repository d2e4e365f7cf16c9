"""``GET /v1/methods``: the adaptation methods a job may use, with schemas and defaults.

Everything here is computed from core's config classes (``service.api.schemas.methods``), the
same definitions the job request is validated against; clients such as the dashboard build
their forms from it instead of copying them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api.deps import PrincipalDep
from service.api.schemas.methods import MethodCatalog, method_catalog

router = APIRouter(prefix="/v1/methods", tags=["methods"])


def _example() -> dict[str, Any]:
    # The live answer cut to one method: exact, and short enough to read in /docs.
    catalog = method_catalog().model_dump(mode="json", by_alias=True)
    return {**catalog, "data": catalog["data"][:1]}


@router.get(
    "",
    response_model=MethodCatalog,
    summary="List the adaptation methods and their settings",
    responses={200: {"content": {"application/json": {"example": _example()}}}},
)
async def list_methods(_caller: PrincipalDep) -> MethodCatalog:
    """Every method: its description, its parameters' JSON Schema and defaults, and the
    training defaults per dataset kind; plus the schema and defaults of the training settings
    all methods share. Any API key may read it."""
    return method_catalog()
