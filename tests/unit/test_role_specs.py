"""Every role's meta/argument_specs.yml matches its defaults/main.yml one to one.

A variable documented in defaults but missing from the specs is never type-checked at the
start of the play; one in the specs but not in defaults has no documented default; a
default that differs between the two files means the docs lie about one of them.
"""

import re
from pathlib import Path

import pytest
import yaml

ROLES = Path(__file__).resolve().parents[2] / "roles"


def _roles():
    return sorted(p.name for p in ROLES.iterdir() if (p / "meta" / "argument_specs.yml").is_file())


def test_every_role_has_argument_specs():
    without = [p.name for p in ROLES.iterdir() if p.is_dir() and not (p / "meta" / "argument_specs.yml").is_file()]
    assert without == []


@pytest.mark.parametrize("role", _roles())
def test_argument_specs_match_defaults(role):
    defaults = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {}
    specs = yaml.safe_load((ROLES / role / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    options = {}
    for entry_point in specs.values():
        options.update(entry_point.get("options") or {})
    assert sorted(options) == sorted(defaults), f"{role}: argument_specs and defaults name different variables"
    # a required option has no default in the specs (its defaults/main.yml entry documents it)
    differing = {name: (options[name].get("default"), defaults[name]) for name in defaults
                 if not options[name].get("required") and options[name].get("default") != defaults[name]}
    assert differing == {}, f"{role}: defaults differ (specs, defaults/main.yml)"


@pytest.mark.parametrize("role", _roles())
def test_private_variables_use_one_prefix(role):
    """Role-internal variables are __<role>_..., never _<role>_... (one style in every role)."""
    single = re.compile(rf"(?<!\w)_{role}_\w")
    found = [f"{path.relative_to(ROLES)}:{n}" for path in sorted((ROLES / role).rglob("*.y*ml"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if single.search(line)]
    assert found == []
