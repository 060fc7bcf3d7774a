"""The one selection spec: a method and its options, written once.

``select.*`` (the config), every sweep arm (``sweep.arms[].*``), the offline scorers
(``core.scoring.Selection``) and the on-policy training loop (``core.onpolicy.SelectionSettings``)
all carry this model, so a new option is one field here. A plain module (pydantic only): loading
a config imports nothing heavy.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from slap_ray.vocabulary import Method, Preconditioner, StrataKind

# Options each method reads (core.selection.select); the others are ignored, so one config
# can drive any method.
METHOD_OPTIONS = {"slap": ("num_strata", "tau", "strata", "budget"), "ccs": ("num_strata",)}
# How an arm's label names a non-default preconditioner ("raw": plain gradient norms).
PRECONDITIONER_LABELS = {"factored": "factored", "none": "raw"}


class SelectionSpec(BaseModel):
    """How each batch is selected: the method and its options (SLAP_METHOD.md sections 1, 4-6)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    method: Method = "slap"
    """Selection method: `slap`, `random`, `full` (keep all), `online_hard` (highest loss),
    `ccs`, `infobatch`."""
    num_strata: int = Field(3, ge=1)
    """Loss strata per batch."""
    tau: float = Field(1.0, gt=0)
    """Temperature of the loss-weighted budget across loss strata (SLAP_METHOD.md, ours); `inf`
    draws the budget uniformly, so it follows the strata's sizes in expectation."""
    strata: StrataKind = "width"
    """How a batch's losses are cut into strata: equal `width` in loss, or equal-count
    `quantile`."""
    preconditioner: Preconditioner = "adam"
    """How LM-head gradient features are preconditioned: exact Adam second moment (`adam`), its
    Adafactor-style rank-1 factorisation (`factored`), or raw gradient norms (`none`, the
    ablation)."""
    projection_dim: int | None = Field(None, ge=1)
    """Random projection of the gradient features to this many dimensions before farthest-point
    selection (None: exact features)."""
    budget: Literal["loss", "proportional"] = "loss"
    """How the kept rows are shared among a batch's loss strata (SLAP, step 3): `loss` draws
    them with probability exp(loss / tau); `proportional` gives each stratum its share of the
    batch by largest remainder (SLAP_METHOD.md section 6)."""
    keep_mix: bool = False
    """Keep each batch's distribution strata in proportion (offline: its k-means clusters, or
    sources with `strata.by: source`; on-policy: the rows' sources, else tasks); the method runs
    within each, SLAP with one selected set (SLAP_METHOD.md section 6)."""
    drop_top: float = Field(0.0, ge=0, lt=1)
    """Fraction of each batch's highest-loss rows (floor of f x B) that no method may keep,
    removed before selection as likely noise; the budget is capped at the rows left (0:
    none)."""

    def options(self) -> dict[str, Any]:
        """The options ``self.method`` reads, as ``core.selection.select`` takes them."""
        return {name: getattr(self, name) for name in METHOD_OPTIONS.get(self.method, ())}

    @property
    def needs_features(self) -> bool:
        """Only SLAP ranks by LM-head gradient features; the others need the losses alone."""
        return self.method == "slap"

    def with_options(self, **options: Any) -> SelectionSpec:
        """This spec with ``options`` replaced (None leaves an option as it is), validated."""
        given = {name: value for name, value in options.items() if value is not None}
        return SelectionSpec.model_validate({**self.model_dump(), **given})


def option_label(name: str, value: Any) -> str:
    """How a set option shows in an arm's label: ``tau0.5``, ``raw`` (no preconditioning)."""
    if name == "preconditioner":
        return PRECONDITIONER_LABELS.get(value, "")
    if name == "budget":
        return "" if value == "loss" else value
    if name == "keep_mix":
        return name if value else ""
    return f"{name}{value:g}" if isinstance(value, float) else f"{name}{value}"


def optional_options() -> dict[str, Any]:
    """Every option of the spec (not ``method``) as an optional field whose None means "as the
    base spec": the type, bounds and description stay those of ``SelectionSpec``. For models
    that override a spec per entry (``sweep.arms[]``)."""
    fields = {}
    for name, info in SelectionSpec.model_fields.items():
        if name == "method":
            continue
        annotation = (
            Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        )
        description = f"{info.description} This arm's value (None: `select.{name}`)."
        fields[name] = (annotation | None, Field(None, description=description))
    return fields
