"""p2pfl.Client (synchronous) against a ControlServer + FakeNodeAPI in a background thread."""

from __future__ import annotations

import io
import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "cli"))
from fakenode import MODEL, PEER_A, SELF_ID, FakeNodeAPI, running_server  # noqa: E402

from p2pfl import Client, NodeNotRunning, TaskFailed, TaskNotFinished, ValidationError  # noqa: E402
from p2pfl.client import ControlError, NotFound, default_data_dir  # noqa: E402


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, FakeNodeAPI]]:
    d = tmp_path_factory.mktemp("node")
    with running_server(d) as api:
        yield Client(d), api


@pytest.fixture
def taskpack(tmp_path: Path) -> Path:
    (tmp_path / "tp").mkdir()
    (tmp_path / "tp" / "manifest.yaml").write_text("kind: TaskPackage\n")
    return tmp_path / "tp"


def test_queries(node: tuple[Client, FakeNodeAPI]) -> None:
    c, _ = node
    assert c.ping()
    assert c.info()["peer_id"] == SELF_ID
    assert [p["peer_id"] for p in c.peers()][0] == PEER_A
    assert {p["status"] for p in c.taskpacks()} == {"verified", "rejected"}
    assert {t["task_id"] for t in c.tasks()} == {"good1", "bad1", "slow1"}
    assert c.task("goo")["status"] == "succeeded"  # a unique prefix is enough


def test_unknown_task_is_keyerror(node: tuple[Client, FakeNodeAPI]) -> None:
    c, _ = node
    with pytest.raises(KeyError) as info:
        c.task("zzz")
    assert isinstance(info.value, NotFound)
    assert str(info.value) == "unknown task zzz"


def test_publish_and_create_task(node: tuple[Client, FakeNodeAPI], taskpack: Path) -> None:
    c, api = node
    out = c.publish(taskpack)
    assert out == {"cid": "bafycidgood1", "name": "wages", "version": "1.0.0", "publisher": SELF_ID}
    assert api.published[-1] == (str(taskpack.resolve()), False, {})
    # A directory is published then run; params travel as strings.
    assert c.create_task(taskpack, params={"rounds": 3, "lr": "0.1"}) == "good1"
    assert api.published[-1] == (str(taskpack.resolve()), True, {"rounds": "3", "lr": "0.1"})
    # A name or cid of a known taskpack is run directly.
    assert c.create_task("wages@1.0.0") == "good1"
    with pytest.raises(NotFound, match="unknown taskpack nothere"):
        c.create_task("nothere")
    with pytest.raises(FileNotFoundError):
        c.publish(taskpack / "missing")


def test_validation_error_comes_back_whole(
    node: tuple[Client, FakeNodeAPI], tmp_path: Path
) -> None:
    c, _ = node
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValidationError) as info:
        c.publish(empty)
    assert info.value.problems == [f"{empty.resolve()}/manifest.yaml: missing"]


def test_trace(node: tuple[Client, FakeNodeAPI]) -> None:
    c, _ = node
    out = io.StringIO()
    assert c.trace("good1", out=out) is True
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and "round 1 done" in lines[3] and "loss=0.55" in lines[3]
    out = io.StringIO()
    assert c.trace("bad1", out=out, json=True) is False
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["kind"] for e in events][-1] == "failed"
    assert events[-1]["task"]["status"] == "failed"
    with pytest.raises(NotFound):
        c.trace("zzz", out=io.StringIO())


def test_wait_and_results(node: tuple[Client, FakeNodeAPI]) -> None:
    c, _ = node
    seen: list[str] = []
    result = c.wait("good1", timeout=30, on_event=lambda e: seen.append(e["kind"]))
    assert result["status"] == "succeeded" and result["model_cid"] == "bafymodel"
    assert seen[-1] == "result"
    with pytest.raises(TaskFailed, match="no quorum"):
        c.wait("bad1")
    with pytest.raises(TimeoutError, match="did not finish within 0.2 s"):
        c.wait("slow1", timeout=0.2)
    with pytest.raises(TaskNotFinished):
        c.get_result("slow1")
    with pytest.raises(TaskFailed):
        c.get_result("bad1")
    assert c.get_result("good1")["reducer"] == PEER_A


def test_read_blob(node: tuple[Client, FakeNodeAPI], monkeypatch: pytest.MonkeyPatch) -> None:
    c, _ = node
    assert c.read_blob("bafymodel") == MODEL
    # Reassembled from several chunks when the blob is bigger than a chunk.
    monkeypatch.setattr("p2pfl.client.BLOB_CHUNK", 1000)
    monkeypatch.setattr("p2pfl.control.server.BLOB_CHUNK", 1000)
    assert c.read_blob("bafymodel") == MODEL
    with pytest.raises(NotFound):
        c.read_blob("nope")


def test_unmapped_error_kind(tmp_path: Path) -> None:
    class Buggy(FakeNodeAPI):
        def tasks(self) -> list[dict[str, object]]:
            raise ZeroDivisionError("oops")

    with running_server(tmp_path, Buggy()):
        with pytest.raises(ControlError) as info:
            Client(tmp_path).tasks()
    assert info.value.kind == "ZeroDivisionError" and str(info.value) == "oops"


def test_no_node(tmp_path: Path) -> None:
    with pytest.raises(NodeNotRunning, match="no node is running in .* \\(no control socket\\)"):
        Client(tmp_path).info()
    # A dead node's socket file: nobody answers.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "control.sock"))
    s.close()
    with pytest.raises(NodeNotRunning, match="is not answering"):
        Client(tmp_path).info()


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("P2PFL_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    assert Client().socket_path == tmp_path / "control.sock"
    monkeypatch.delenv("P2PFL_DATA_DIR")
    assert default_data_dir() == Path("~/.p2pfl").expanduser()
