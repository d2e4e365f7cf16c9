"""Path parameters of the routes, each with the description the API docs show.

Every id and name holds no control character (:mod:`service.names`): a NUL in one
failed PostgreSQL's query (a 500), and no id or name the service gives out has one, so it is
refused as a 422 naming the parameter, after the caller is checked and before any lookup.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

from service.names import NoControlCharacters

TenantId = Annotated[str, Path(description="The tenant's id."), NoControlCharacters]
KeyId = Annotated[str, Path(description="The API key's id (not its secret)."), NoControlCharacters]
DatasetId = Annotated[
    str, Path(description="The dataset's id (the same as its file id)."), NoControlCharacters
]
FileId = Annotated[
    str, Path(description="The file's id (the same as its dataset id)."), NoControlCharacters
]
JobId = Annotated[str, Path(description="The fine-tuning job's id."), NoControlCharacters]
AdapterNamePath = Annotated[str, Path(description="The adapter's name."), NoControlCharacters]
ModelId = Annotated[
    str,
    Path(
        description="The base model's name (slash included, e.g. "
        "`sentence-transformers/all-MiniLM-L6-v2`), an adapter's name, or a job checkpoint's "
        "(`<adapter>:ckpt-step-<N>`)."
    ),
    NoControlCharacters,
]
