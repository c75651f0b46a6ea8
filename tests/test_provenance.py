"""`provenance`: the commit, CPU and versions named beside every figure."""
import io
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


def test_a_checkout_with_changes_to_tracked_files_is_dirty_and_untracked_files_do_not_count(fresh_commit, tmp_path,
                                                                                             monkeypatch):
    """Figures from code that differs from its commit say so; a stray file (a run's output, a note) changes
    no code and does not."""
    git = lambda *args: subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,  # noqa: E731
                                       text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "train.py").write_text("print(1)\n")
    git("add", "train.py")
    git("-c", "user.name=u", "-c", "user.email=u@example.org", "commit", "-q", "-m", "tinyin")
    head = git("rev-parse", "HEAD")[:12]
    monkeypatch.setattr(provenance, "ROOT", tmp_path.resolve())
    (tmp_path / "notes.txt").write_text("untracked")
    assert fresh_commit() == head
    (tmp_path / "train.py").write_text("print(2)\n")
    provenance.commit.cache_clear()
    assert fresh_commit() == f"{head}-dirty"


def test_the_cpu_is_named_by_its_model_name_line(monkeypatch):
    """/proc/cpuinfo has a "model" line (a number) before "model name": the name, not the number, is the CPU."""
    cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel\t\t: 85\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n"
    monkeypatch.setattr("pipeline.provenance.open", lambda path: io.StringIO(cpuinfo), raising=False)
    assert provenance.cpu_name() == "Intel(R) Xeon(R) CPU @ 2.20GHz"


def test_without_a_model_name_line_the_cpu_is_platforms_processor_else_the_machine(monkeypatch):
    """An ARM kernel's /proc/cpuinfo names no model (and macOS has none): platform.processor() names the CPU
    where it can ("arm"), the machine ("aarch64") where it is empty."""
    import platform

    monkeypatch.setattr("pipeline.provenance.open", lambda path: io.StringIO("processor\t: 0\nBogoMIPS\t: 50.00\n"),
                        raising=False)
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert provenance.cpu_name() == "arm"
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert provenance.cpu_name() == "aarch64"


def test_a_figure_measured_on_the_cpu_names_no_gpu_and_no_cuda():
    """A CUDA build of torch on a CPU run: the CUDA version would name a toolkit the figure never used."""
    import torch

    env = provenance.environment(torch.device("cpu"))
    assert (env["device"], env["gpu"], env["cuda"]) == ("cpu", None, None)
