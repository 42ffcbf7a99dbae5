from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from p2pfl.cli.taskpack_cmds import new_cmd, pack_cmd
from p2pfl.errors import LocalProtocolError
from p2pfl.store.cid import cid_of
from p2pfl.taskpack.manifest import load_manifest
from p2pfl.taskpack.pack import pack_dir, unpack
from p2pfl.taskpack.params import load_params
from p2pfl.taskpack.scaffold import TASK_TYPES, class_name_for, new_taskpack

EXPECTED_FILES = {
    "manifest.yaml",
    "src/task.py",
    "configs/default.yaml",
    "configs/schema.json",
    "requirements.txt",
    "tests/test_task.py",
    "README.md",
}


def test_generated_taskpacks_validate_pack_and_pass_their_tests(tmp_path: Path) -> None:
    copies = []
    for task_type in TASK_TYPES:
        root = new_taskpack(f"demo-{task_type}", task_type, tmp_path, author='Ada "A" L')
        files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
        assert files == EXPECTED_FILES
        manifest = load_manifest(root)
        assert manifest.name == f"demo-{task_type}" and manifest.spec.type == task_type
        assert manifest.metadata.author == 'Ada "A" L'
        assert load_params(root, {})  # defaults satisfy the generated schema
        archive = pack_dir(root)
        # Run the generated tests from an unpacked copy, as a node would hold it.
        copy = tmp_path / "unpacked" / task_type
        unpack(archive, copy)
        copies.append((copy, archive))
    # One interpreter for all (startup dominates); importlib mode because every test
    # file is called test_task.py.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib"]
        + [str(copy / "tests") for copy, _ in copies],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "11 passed" in result.stdout, result.stdout
    for copy, archive in copies:
        assert pack_dir(copy) == archive  # running the tests left nothing that gets packed


def test_refuses_existing_target_and_bad_names(tmp_path: Path) -> None:
    new_taskpack("taken", "analysis", tmp_path)
    with pytest.raises(LocalProtocolError, match="already exists"):
        new_taskpack("taken", "training", tmp_path)
    with pytest.raises(LocalProtocolError, match="not a valid taskpack name"):
        new_taskpack("Bad Name", "training", tmp_path)
    with pytest.raises(
        LocalProtocolError, match="choose one of training, analysis, inference, preprocessing"
    ):
        new_taskpack("ok", "regression", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no leftovers


def test_class_name_for() -> None:
    assert class_name_for("wages-logreg") == "WagesLogregTask"
    assert class_name_for("a.b-c") == "ABCTask"
    assert class_name_for("3d-scan") == "T3dScanTask"


def test_cli_new_and_pack(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        new_cmd, ["my-stats", "--type", "analysis", "--dir", str(tmp_path), "--json"]
    )
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["name"] == "my-stats" and info["type"] == "analysis"
    root = Path(info["path"])
    again = runner.invoke(new_cmd, ["my-stats", "--dir", str(tmp_path)])
    assert again.exit_code != 0 and "already exists" in again.output

    out = tmp_path / "archives" / "my-stats.tar"
    res = runner.invoke(pack_cmd, [str(root), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    archive = out.read_bytes()
    assert info["cid"] == cid_of(archive) == cid_of(pack_dir(root))
    assert (info["name"], info["version"], info["size"]) == ("my-stats", "0.1.0", len(archive))
    assert info["files"] == len(EXPECTED_FILES)
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind

    res = runner.invoke(pack_cmd, [str(root)])
    assert res.exit_code == 0 and res.output.strip() == info["cid"]


def test_cli_pack_lists_every_problem(tmp_path: Path) -> None:
    root = new_taskpack("broken", "training", tmp_path)
    text = (root / "manifest.yaml").read_text()
    text = text.replace("version: 0.1.0", "version: 1.x").replace("memory: 512Mi", "memory: lots")
    (root / "manifest.yaml").write_text(text)
    res = CliRunner().invoke(pack_cmd, [str(root)])
    assert res.exit_code != 0
    assert "metadata.version: '1.x' is not semver" in res.output
    assert "spec.requirements.memory: 'lots' is not a valid size" in res.output


DOC_EXAMPLES = {
    "training": "wages-logreg",
    "analysis": "wages-stats",
    "inference": "wages-scores",
    "preprocessing": "wages-standardize",
}


def test_docs_show_one_complete_example_per_type_as_the_scaffold_writes_it(
    tmp_path: Path,
) -> None:
    """docs/taskpacks.md stays true: each example's files are what `p2pfl new` writes."""
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "taskpacks.md").read_text()
    for task_type, name in DOC_EXAMPLES.items():
        title = f"## Example: {task_type} (`{name}`)"
        assert title in doc, title
        start = doc.index(title)
        end = doc.find("\n## ", start + len(title))
        section = doc[start : end if end > 0 else None]
        shown = dict(re.findall(r"`([^`]+)`:\n\n```\w+\n(.*?)```", section, re.S))
        assert set(shown) == {
            "manifest.yaml",
            "configs/default.yaml",
            "configs/schema.json",
            "src/task.py",
        }
        root = new_taskpack(name, task_type, tmp_path, author="Ada Lovelace")
        for rel, body in shown.items():
            assert (root / rel).read_text() == body, f"{task_type}: {rel} differs from the docs"
