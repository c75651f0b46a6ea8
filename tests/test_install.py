"""The Python that setup.cfg asks for and the one the pinned set in constraints.txt (README's install) needs agree."""
import configparser
import importlib.metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = [f"3.{minor}" for minor in range(8, 20)]


def _pins():
    """(name, version) of each `name==version` line of constraints.txt."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            yield requirement.name, next(iter(requirement.specifier)).version


def test_python_requires_is_the_oldest_python_the_pinned_set_takes():
    """setup.cfg said python_requires >=3.10, where the pinned set has no build (numpy 2.4, pyarrow 26, matplotlib
    3.11 and more need 3.11): pip on 3.10 went on to `-c constraints.txt` and ended in ResolutionImpossible, and
    without it installed a set never tested. Each pin's Requires-Python is read from the distribution installed
    at that version (no network): the oldest Python they all take is setup.cfg's, and README's."""
    needs = {}
    for name, version in _pins():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a pin this platform does not install (tzdata)
        if dist.version == version and dist.metadata.get("Requires-Python"):
            needs[name] = SpecifierSet(dist.metadata["Requires-Python"])
    if len(needs) < 10:
        pytest.skip("this environment is not the pinned set (make install builds it)")
    oldest = next(python for python in PYTHONS if all(python in spec for spec in needs.values()))
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["options"]["python_requires"] == f">={oldest}"
    assert f"with Python ≥ {oldest} " in (ROOT / "README.md").read_text()
