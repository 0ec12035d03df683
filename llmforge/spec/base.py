"""Base classes of the spec language: strict models and component references."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError


class StrictModel(BaseModel):
    """Every spec model rejects unknown keys: a typo must fail `validate`, not step 9000."""

    # defer_build: `validate` uses the registry-typed subclasses of these models, so building
    # every base's validator at import would be wasted start-up time (validate has 0.5 s).
    model_config = ConfigDict(extra="forbid", validate_default=True, defer_build=True)


def field_error(model: type[BaseModel], field: str | tuple[str | int, ...], value: object, message: str) -> ValidationError:
    """A cross-field error raised from a model validator but located at `field` (a key or a path).

    A plain ValueError points at the whole model, so `validate` would show the section's
    line instead of the offending key (or the override that set it).
    """
    error = PydanticCustomError("spec_conflict", "{message}", {"message": message})
    loc = field if isinstance(field, tuple) else (field,)
    return ValidationError.from_exception_data(model.__name__, [InitErrorDetails(type=error, loc=loc, input=value)])


class ComponentRef(BaseModel):
    """Placeholder for 'a component of kind K, chosen by name'.

    Fields typed with a subclass of this are rewritten, at validation time, into a union
    of the registered components' own options models, discriminated by `name` (or by
    `type` for stages). So `lr` is validated by the optimizer that uses it.
    """

    model_config = ConfigDict(extra="allow")
    kind: ClassVar[str] = ""
    discriminator: ClassVar[str] = "name"

    name: str = Field(description="Registered component name.")


def component_ref(kind: str, discriminator: str = "name") -> type[ComponentRef]:
    """Make the placeholder type for one component kind."""
    title = "".join(p.title() for p in kind.split("_")) + "Ref"
    return type(title, (ComponentRef,), {"kind": kind, "discriminator": discriminator, "__module__": __name__})


TokenizerRef = component_ref("tokenizer")
SourceRef = component_ref("source")
ModelRef = component_ref("model")
OptimizerRef = component_ref("optimizer")
LRScheduleRef = component_ref("lr_schedule")
StageRef = component_ref("stage", discriminator="type")
EvaluatorRef = component_ref("evaluator")
CallbackRef = component_ref("callback")
RewardRef = component_ref("reward")
