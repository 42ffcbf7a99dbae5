"""The example taskpacks: manifests and params validate, src/task.py has one Task, and each
pack's own tests pass when run the documented way (pytest from the pack directory)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfl.taskpack.manifest import load_manifest
from p2pfl.taskpack.params import load_params
from p2pfl.taskpack.sdk import Task

PACKS = Path(__file__).resolve().parents[2] / "taskpacks"
NAMES = [
    "fedavg-mlp-digits",
    "federated-stats",
    "standardize",
    "fedavg-mlp-tabular",
    "evaluate-model",
    "mlp-inference",
]
LAYOUT = [
    "manifest.yaml",
    "src/task.py",
    "configs/default.yaml",
    "configs/schema.json",
    "requirements.txt",
    "tests/test_task.py",
    "README.md",
]


@pytest.mark.parametrize("name", NAMES)
def test_pack_layout_manifest_params_and_task(name: str) -> None:
    root = PACKS / name
    for rel in LAYOUT:
        assert (root / rel).is_file(), rel
    manifest = load_manifest(root / "manifest.yaml")
    assert manifest.name == name
    params = load_params(root)
    assert isinstance(params, dict) and params
    spec = importlib.util.spec_from_file_location(f"pack_{name}", root / "src" / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tasks = [
        c
        for c in vars(module).values()
        # Defined in task.py itself (not an imported base such as InferenceTask).
        if isinstance(c, type) and issubclass(c, Task) and c.__module__ == module.__name__
    ]
    assert len(tasks) == 1


def _run_pack_tests(name: str) -> None:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider"],
        cwd=PACKS / name,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


def test_federated_stats_pack_tests_in_process(tmp_path: Path) -> None:
    """The cheap pack's own tests, called directly (no subprocess start-up cost)."""
    spec = importlib.util.spec_from_file_location(
        "stats_pack_tests", PACKS / "federated-stats" / "tests" / "test_task.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [f for n, f in vars(module).items() if n.startswith("test_") and callable(f)]
    assert len(tests) >= 3
    for i, test in enumerate(tests):
        work = tmp_path / str(i)
        work.mkdir()
        test(work)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_pack_tests_pass_from_pack_dir(name: str) -> None:
    _run_pack_tests(name)


def test_lora_pack_layout_manifest_and_task_without_the_llm_extra() -> None:
    """lora-text validates and its Task loads (the runtime's way: it imports a helper module
    relatively) without transformers or peft: they are imported only when a hook runs."""
    from p2pfl.runtime.loader import load_task_class

    root = PACKS / "lora-text"
    for rel in LAYOUT:
        assert (root / rel).is_file(), rel
    manifest = load_manifest(root / "manifest.yaml")
    llm = manifest.spec.llm_config
    assert manifest.name == "lora-text" and manifest.spec.requirements.gpu == "optional"
    assert llm is not None and llm.training_method == "lora" and llm.lora is not None
    assert llm.lora.r == 16 and llm.lora.lora_alpha == 32
    params = load_params(root, {"r": "4", "target_modules": "[query]"})
    assert params["r"] == 4 and params["target_modules"] == ["query"]
    assert load_task_class(root).__name__ == "LoRAText"


@pytest.mark.slow
@pytest.mark.llm
def test_lora_pack_tests_pass_from_pack_dir() -> None:
    if any(importlib.util.find_spec(m) is None for m in ("peft", "transformers")):
        pytest.skip("needs the [llm] extra: pip install -e '.[llm]'")
    _run_pack_tests("lora-text")
