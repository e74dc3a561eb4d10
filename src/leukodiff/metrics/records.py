"""Typed result records to and from JSON: evaluations return dataclasses, store them as
JSON (`to_plain`), and the reports render them again from the stored file (`from_plain`),
so a results section can be rebuilt without rerunning the evaluation."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class Record:
    """A typed result that writes itself as JSON-ready dicts and lists (`to_plain`)."""

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


def to_plain(record: Any) -> Any:
    """Dicts, lists and numbers (`json.dumps` writes them; tuples become lists). A field
    that is None by default and None now is left out: a part the run did not measure is
    absent from the JSON, as it was when the results were dicts."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: to_plain(getattr(record, f.name)) for f in dataclasses.fields(record)
                if not (getattr(record, f.name) is None and f.default is None)}
    if isinstance(record, dict):
        return {key: to_plain(value) for key, value in record.items()}
    if isinstance(record, list | tuple):
        return [to_plain(value) for value in record]
    return record


def from_plain(kind: Any, data: Any) -> Any:
    """`data` (read from JSON) as `kind`: a dataclass, built field by field from its type
    hints; dicts, lists and tuples of them; `X | None`; plain values as they are. A field
    the data lacks takes its default (records written before the field existed)."""
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{f.name: from_plain(hints[f.name], data[f.name])
                       for f in dataclasses.fields(kind) if f.name in data})
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if data is None:
            return None
        (other,) = (a for a in args if a is not type(None))
        return from_plain(other, data)
    if origin is dict:
        return {key: from_plain(args[1], value) for key, value in data.items()}
    if origin is list:
        return [from_plain(args[0], value) for value in data]
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_plain(args[0], value) for value in data)
        return tuple(from_plain(a, value) for a, value in zip(args, data, strict=True))
    return data
