"""Read the catalog from `tally.toml` (TOML, validated strictly: a typo stops start-up instead
of silently mispricing a tool)."""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tally.domain import values
from tally.domain.catalog import Catalog, Package, Surprise, Tool
from tally.domain.errors import InvalidInput

DEFAULT_PATH = Path("tally.toml")
_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

Credits = Annotated[int, Field(ge=1, le=values.MAX_AMOUNT)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Tool(_Strict):
    name: str = Field(min_length=1, max_length=200)
    credits_per_unit: Credits
    unit: str = Field(default="image", min_length=1, max_length=40)


class _Surprise(_Strict):
    min: Credits
    max: Credits


class _Gumroad(_Strict):
    permalink: str | None = None
    product_id: str | None = None


class _Stripe(_Strict):
    price_id: str | None = None


class _Package(_Strict):
    name: str = Field(min_length=1, max_length=200)
    credits: Credits | None = None
    surprise: _Surprise | None = None
    price: int = Field(ge=0)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    validity: str = "P2Y"
    gumroad: _Gumroad = _Gumroad()
    stripe: _Stripe = _Stripe()

    @model_validator(mode="after")
    def _one_amount(self) -> _Package:
        if (self.credits is None) == (self.surprise is None):
            raise ValueError("a package has credits or a surprise range, not both")
        if self.surprise is not None and self.surprise.min > self.surprise.max:
            raise ValueError("surprise.min is above surprise.max")
        values.Validity(self.validity)
        return self


class _Policies(_Strict):
    refund_window_days: int = Field(default=30, ge=0, le=3650)


class _File(_Strict):
    policies: _Policies = _Policies()
    tools: dict[str, _Tool] = {}
    packages: dict[str, _Package] = {}


def load(path: Path | None = None) -> Catalog:
    """The catalog from `path`, else ./tally.toml if it exists, else the built-in default."""
    if path is None:
        path = DEFAULT_PATH if DEFAULT_PATH.exists() else None
    if path is None:
        return builtin()
    return parse(path.read_text("utf-8"), str(path))


def builtin() -> Catalog:
    """The default catalog of docs/rules.md §5, shipped inside the package."""
    text = resources.files("tally").joinpath("default_catalog.toml").read_text("utf-8")
    return parse(text, "the built-in catalog")


def parse(text: str, where: str) -> Catalog:
    try:
        raw: dict[str, Any] = tomllib.loads(text)
        found = _File.model_validate(raw)
    except (tomllib.TOMLDecodeError, ValidationError, InvalidInput) as error:
        raise InvalidInput(f"{where} is not a valid catalog: {error}") from error
    for kind, ids in (("tool", found.tools), ("package", found.packages)):
        for item_id in ids:
            if not _ID.fullmatch(item_id):
                raise InvalidInput(f"{where}: {kind} id {item_id!r} is not [a-z0-9_-]")
    return Catalog(
        tools={
            tool_id: Tool(tool_id, t.name, t.credits_per_unit, t.unit)
            for tool_id, t in found.tools.items()
        },
        packages={
            package_id: Package(
                id=package_id,
                name=p.name,
                credits=p.credits,
                surprise=None if p.surprise is None else Surprise(p.surprise.min, p.surprise.max),
                price=p.price,
                currency=p.currency,
                validity=p.validity,
                gumroad_permalink=p.gumroad.permalink or package_id,
                gumroad_product_id=p.gumroad.product_id,
                stripe_price_id=p.stripe.price_id or f"price_{package_id}",
            )
            for package_id, p in found.packages.items()
        },
        refund_window_days=found.policies.refund_window_days,
    )
