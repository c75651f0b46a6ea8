"""`provenance.commit`: the commit named beside every figure."""
import subprocess

import pytest

from pipeline import provenance


@pytest.fixture
def fresh_commit():
    """`commit()` asked again (it caches its answer per process), and again after the test."""
    provenance.commit.cache_clear()
    yield provenance.commit
    provenance.commit.cache_clear()


def test_the_checkout_names_its_own_commit(fresh_commit):
    git = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=provenance.ROOT, capture_output=True, text=True)
    if git.returncode:
        pytest.skip("a copy of the checkout without .git (the GPU machine's)")
    assert fresh_commit().removesuffix("-dirty") == git.stdout.strip()


def test_an_installed_copy_inside_another_git_project_names_no_commit(fresh_commit, tmp_path, monkeypatch):
    """tinyin installed (not editable) into a venv inside the user's own git project: the user's commit, and
    its "-dirty", were named as the one behind env.json and the bench headers."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-c", "user.name=u", "-c", "user.email=u@example.org", "commit", "-q", "--allow-empty",
                    "-m", "the user's project"], cwd=tmp_path, check=True)
    site = tmp_path / ".venv" / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.setattr(provenance, "ROOT", site)
    monkeypatch.delenv("TINYIN_COMMIT", raising=False)
    assert fresh_commit() == "unknown"
    monkeypatch.setenv("TINYIN_COMMIT", "0123456789ab")
    provenance.commit.cache_clear()
    assert fresh_commit() == "0123456789ab"
