"""The catalog file: the default matches docs/rules.md §5, tools price jobs, mistakes stop
start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from tally.adapters import catalog_file
from tally.domain.catalog import MAX_QUANTITY
from tally.domain.errors import InvalidAmount, InvalidInput, UnknownTool

ROOT = Path(__file__).resolve().parents[2]


def test_the_default_catalog_has_the_specs_tools_and_packages() -> None:
    catalog = catalog_file.builtin()
    prices = {tool.id: tool.credits_per_unit for tool in catalog.tools.values()}
    assert prices == {
        "background": 1,
        "logo": 1,
        "recolor": 1,
        "image_extender": 1,
        "ai_model": 2,
        "footwear_model": 2,
        "video": 2,
        "portrait": 1,
        "fantasy_pet": 1,
        "concept_art": 1,
    }
    credits = {p.id: p.credits for p in catalog.packages.values()}
    assert credits == {
        "starter": 5,
        "popular": 10,
        "pro": 25,
        "power": 40,
        "lifetime": 100,
        "surprise": None,
    }
    assert catalog.packages["lifetime"].validity == "never"
    assert catalog.packages["surprise"].surprise is not None
    assert catalog.packages["pro"].gumroad_permalink == "pro"
    assert catalog.packages["pro"].stripe_price_id == "price_pro"
    assert catalog.refund_window_days == 30


def test_the_shipped_tally_toml_is_the_default() -> None:
    shipped = (ROOT / "tally.toml").read_text()
    assert catalog_file.parse(shipped, "tally.toml") == catalog_file.builtin()


def test_tools_price_jobs_in_whole_units() -> None:
    catalog = catalog_file.builtin()
    assert catalog.tool("video").cost(3) == 6
    assert catalog.tool("portrait").cost("4") == 4
    for bad in (0, -1, 1.5, "2.0", True, MAX_QUANTITY + 1):
        with pytest.raises(InvalidAmount):
            catalog.tool("video").cost(bad)
    for unknown in ("teleporter", "", None, 3):
        with pytest.raises(UnknownTool):
            catalog.tool(unknown)


@pytest.mark.parametrize(
    "text",
    [
        "[tools.x]\nname='X'\ncredits_per_unit=0\n",  # free tools are a typo
        "[tools.x]\nname='X'\ncredits_per_unit=1.5\n",  # rule 1
        "[tools.x]\nname='X'\ncredits_per_unit=1\ncost=2\n",  # unknown field
        "[tools.X]\nname='X'\ncredits_per_unit=1\n",  # ids are lower case
        "[packages.p]\nname='P'\nprice=1\ncurrency='USD'\n",  # neither credits nor surprise
        "[packages.p]\nname='P'\ncredits=1\nsurprise={min=1,max=2}\nprice=1\ncurrency='USD'\n",
        "[packages.p]\nname='P'\nsurprise={min=5,max=2}\nprice=1\ncurrency='USD'\n",
        "[packages.p]\nname='P'\ncredits=1\nprice=1\ncurrency='USD'\nvalidity='2 years'\n",
        "[policies]\nrefund_window_days=-1\n",
        "this is not toml",
    ],
)
def test_a_malformed_catalog_is_refused(text: str) -> None:
    with pytest.raises(InvalidInput):
        catalog_file.parse(text, "test.toml")


def test_a_catalog_file_is_read_from_its_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text("[tools.upscale]\nname='Upscaler'\ncredits_per_unit=3\n")
    catalog = catalog_file.load(path)
    assert list(catalog.tools) == ["upscale"]
    assert catalog.packages == {}
