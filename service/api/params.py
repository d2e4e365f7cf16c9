"""Path parameters of the routes, each with the description the API docs show."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

TenantId = Annotated[str, Path(description="The tenant's id.")]
KeyId = Annotated[str, Path(description="The API key's id (not its secret).")]
DatasetId = Annotated[str, Path(description="The dataset's id (the same as its file id).")]
FileId = Annotated[str, Path(description="The file's id (the same as its dataset id).")]
JobId = Annotated[str, Path(description="The fine-tuning job's id.")]
AdapterNamePath = Annotated[str, Path(description="The adapter's name.")]
ModelId = Annotated[
    str,
    Path(
        description="The base model's name (slash included, e.g. "
        "`sentence-transformers/all-MiniLM-L6-v2`) or an adapter's name."
    ),
]
