"""The catalog (docs/rules.md §5): tools that spend credits and packages that sell them. Pure rules;
the file `tally.toml` is read by `tally.adapters.catalog_file`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from tally.domain import values
from tally.domain.errors import InvalidAmount, UnknownTool

#: The most units one hold or debit may ask a tool for: far above any real job, and small
#: enough that credits_per_unit x quantity stays exact.
MAX_QUANTITY: Final = 1_000_000


@dataclass(frozen=True)
class Tool:
    id: str
    name: str
    credits_per_unit: int
    unit: str

    def cost(self, quantity: object) -> int:
        """Rule 1 for quantities too: whole numbers from 1 to MAX_QUANTITY."""
        units = values.credits(quantity, field="quantity")
        if units > MAX_QUANTITY:
            raise InvalidAmount(f"quantity must be at most {MAX_QUANTITY}")
        return values.credits(self.credits_per_unit * units)


@dataclass(frozen=True)
class Surprise:
    min: int
    max: int


@dataclass(frozen=True)
class Package:
    id: str
    name: str
    credits: int | None
    surprise: Surprise | None
    price: int  # in the currency's minor unit (cents)
    currency: str
    validity: str  # ISO 8601 duration or "never"
    gumroad_permalink: str | None = None
    gumroad_product_id: str | None = None
    stripe_price_id: str | None = None


@dataclass(frozen=True)
class Catalog:
    tools: dict[str, Tool] = field(default_factory=dict)
    packages: dict[str, Package] = field(default_factory=dict)
    refund_window_days: int = 30

    def tool(self, tool_id: object) -> Tool:
        found = self.tools.get(tool_id) if isinstance(tool_id, str) else None
        if found is None:
            raise UnknownTool(
                f"no tool {str(tool_id)[:64]!r} in the catalog", tool=str(tool_id)[:64]
            )
        return found
