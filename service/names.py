"""The rule every id, name and file name the API takes follows: no control character.

No id or name the service gives out has one; PostgreSQL's text cannot hold NUL at all (a query
or a row with one failed: a 500); the others are invisible where names are shown and split log
lines. So one is refused as a 422 naming the field: path ids and names
(``service.api.params``), cursors and id filters, dataset, file and key names, a job's files
and model, generation's ``model`` and ``reward_adapter``.
"""

from __future__ import annotations

import re

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

CONTROL_CHARACTERS = "control characters (U+0000 to U+001F)"
CONTROL_CHARACTER_CODE = "control_character"
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f]")


def has_control_characters(text: str) -> bool:
    return _CONTROL_CHARACTER.search(text) is not None


def _refuse_control_characters(text: str | None) -> str | None:
    # None passes: on an optional field the rule is its text's (the metadata then sits on the
    # field, after pydantic has applied the field's length bounds to the text as usual).
    if text is not None and has_control_characters(text):
        raise PydanticCustomError(
            CONTROL_CHARACTER_CODE, f"String should not contain {CONTROL_CHARACTERS}"
        )
    return text


# Pydantic's check of the rule, for a ``str`` field's or parameter's ``Annotated`` metadata.
NoControlCharacters = AfterValidator(_refuse_control_characters)
