"""Payload validation: a handler's `payload` annotated with a pydantic model or a dataclass.

```python
class Reading(BaseModel):
    value: float
    unit: str = "C"

async def data(sensor_id: str, payload: Reading) -> None: ...
```

The handler receives a validated `Reading`. A payload that does not validate never reaches the
handler: the message goes to the dead-letter topic with error type `PayloadValidationError` and
the list of failing fields. Input values are left out of the error (and so of the logs), since
payloads may carry personal data or secrets.

The validator is built once, when the route is registered, by `core.routing.handler.HandlerSpec`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import typing
from typing import Any, Callable

from pydantic import BaseModel, TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from core.routing.context import MessageContext
from core.foundation.failures import DeadLetter

Getter = Callable[[MessageContext], Any]

# A payload error names at most this many fields; the rest are counted.
_MAX_REPORTED = 10


class PayloadValidationError(DeadLetter):
    """The payload does not fit the handler's model; the message is dead-lettered with this text."""


def is_validated_type(annotation: Any) -> bool:
    """True for a pydantic model class or a dataclass class (the annotations that trigger validation)."""
    if not isinstance(annotation, type):
        return False
    return issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation)


def payload_annotation(fn: Callable[..., Any], parameter: inspect.Parameter) -> Any:
    """The resolved annotation of `parameter`, or None if absent or not resolvable.

    String annotations (`from __future__ import annotations`) are resolved in the handler's module.
    """
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        return None
    if not isinstance(annotation, str):
        return annotation
    target: Any = fn
    while isinstance(target, functools.partial):
        target = target.func
    target = inspect.unwrap(getattr(target, "__func__", target))
    if not inspect.isfunction(target) and callable(getattr(target, "__call__", None)):
        target = getattr(target.__call__, "__func__", target.__call__)
    try:
        return typing.get_type_hints(target).get(parameter.name)
    except Exception:
        namespace = getattr(target, "__globals__", {})
        try:
            return eval(annotation, dict(namespace))  # noqa: S307 - the handler's own annotation text
        except Exception:
            return None


def payload_getter(fn: Callable[..., Any], parameter: inspect.Parameter, where: str) -> Getter | None:
    """A getter returning the validated payload, or None when `payload` needs no validation."""
    model = payload_annotation(fn, parameter)
    if not is_validated_type(model):
        return None
    try:
        adapter: TypeAdapter[Any] = TypeAdapter(model)
    except Exception as exc:
        raise TypeError(f"{where}: cannot build a validator for payload type {model.__qualname__}: {exc}") from None
    name = model.__qualname__
    validate_python = adapter.validate_python
    validate_json = adapter.validate_json

    def validated(context: MessageContext) -> Any:
        payload = context.payload
        try:
            if isinstance(payload, (str, bytes, bytearray)):
                return validate_json(payload)
            return validate_python(payload)
        except PydanticValidationError as exc:
            raise PayloadValidationError(f"payload is not a valid {name}: {describe_errors(exc)}") from None

    return validated


def describe_errors(exc: PydanticValidationError) -> str:
    """`field: message; other.field: message` without the offending input values."""
    parts: list[str] = []
    errors = exc.errors(include_input=False, include_url=False)
    for error in errors[:_MAX_REPORTED]:
        location = ".".join(str(part) for part in error.get("loc", ())) or "(payload)"
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    if len(errors) > _MAX_REPORTED:
        parts.append(f"and {len(errors) - _MAX_REPORTED} more")
    return "; ".join(parts)


def to_jsonable(value: Any) -> Any:
    """A model or dataclass instance as plain JSON data (handy for handlers that echo what they got)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json.loads(TypeAdapter(type(value)).dump_json(value))
    return value
