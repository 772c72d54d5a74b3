"""The design page stays true to the code: its generated column reference, and every file it names exists."""

import re

from helpers import ROOT

from schemas import column_reference


def test_the_column_reference_is_the_generated_one():
    page = (ROOT / "docs" / "architecture.md").read_text()
    section = page.split("<!-- columns:begin -->\n", 1)[1].split("<!-- columns:end -->", 1)[0]
    assert section == column_reference(), "regenerate docs/architecture.md's columns from schemas.column_reference()"


def test_every_module_the_design_page_names_exists():
    page = (ROOT / "docs" / "architecture.md").read_text()
    paths = set(re.findall(r"`((?:rgsd_pipeline|stages|schemas|tests|configs|bench)/[\w/.]+\.(?:py|yaml))`", page))
    modules = set(re.findall(r"`(\w+\.py)`", page))  # bare names are modules of the library
    missing = [p for p in paths if not (ROOT / p).exists()]
    missing += [m for m in modules if not list((ROOT / "rgsd_pipeline").rglob(m))]
    assert paths and modules and not missing, missing


def test_code_points_to_the_design_page_not_an_outside_one():
    sources = [p for folder in ("rgsd_pipeline", "stages", "schemas", "configs") for p in (ROOT / folder).rglob("*")
               if p.suffix in (".py", ".yaml")] + [ROOT / "Makefile"]
    assert not [p for p in sources if "DESIGN.md" in p.read_text()]


def test_the_design_page_lists_every_placement_key_and_no_other():
    from rgsd_pipeline.recipe import PLACEMENT

    page = (ROOT / "docs" / "architecture.md").read_text()
    table = page.split("| placement keys | why they are not the recipe |", 1)[1].split("\n\n", 1)[0]
    named = {key for row in table.splitlines()[2:] for key in re.findall(r"`(\w+\.\w+)`", row.split(" | ")[0])}
    assert named == set(PLACEMENT), named ^ set(PLACEMENT)
