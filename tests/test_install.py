"""install.sh holds every package to constraints.txt, the versions the suite last passed with: each of
pyproject.toml's requirements must be pinned there, at a version its range admits."""

from __future__ import annotations

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

# install.sh pins these two itself, before the constraints apply (their build differs by machine).
PINNED_BY_INSTALL_SH = {"torch", "torchvision"}


def constraint_pins() -> dict:
    """constraints.txt as {canonical name: version}."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_every_requirement_is_pinned_at_a_version_its_range_admits():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    pins = constraint_pins()
    unpinned = [
        r.name for r in requirements if canonicalize_name(r.name) not in pins | dict.fromkeys(PINNED_BY_INSTALL_SH)
    ]
    outside = [
        f"{r.name}=={pins[canonicalize_name(r.name)]} (pyproject: {r.specifier})"
        for r in requirements
        if canonicalize_name(r.name) in pins and not r.specifier.contains(pins[canonicalize_name(r.name)])
    ]
    assert not unpinned, f"in pyproject.toml but not in constraints.txt: {unpinned}"
    assert not outside, f"constraints.txt pins outside pyproject.toml's range: {outside}"
    assert not PINNED_BY_INSTALL_SH & pins.keys(), "install.sh pins the torch pair; constraints.txt must not"


def test_install_sh_installs_with_the_constraints():
    script = (ROOT / "install.sh").read_text()
    assert "-c constraints.txt -e '.[dev]'" in script
