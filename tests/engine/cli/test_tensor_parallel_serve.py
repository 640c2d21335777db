"""engine-serve --tensor-parallel-size 2 (and --pipeline-parallel-size 2, and a headless second
node) over real processes and sockets: the openai SDK gets the same greedy completion and
embedding as from one rank, and a rank that dies takes the server down (readiness
NOT_SERVING, exit 1) within seconds instead of leaving it hung in a collective."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import openai
import pytest
import torch
from engine_process import REPO_ROOT, EngineProcess, free_port, start_engine
from grpc_health.v1 import health_pb2
from mesh_helpers import wait_until
from serve_tree import READINESS, HealthWatch, children, live_group_members

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# "Within seconds" is the behaviour; the bound is wide because the machine is shared.
EXIT_BOUND_S = 30.0


def _serve(model_dir: Path, log: Path, *flags: str) -> EngineProcess:
    return start_engine(model_dir, "--log-level", "info", *flags, role="all", log_path=log)


def _answers(server: EngineProcess) -> tuple[str, list[float]]:
    """A greedy completion, and the embedding of a prompt (a generative model's last-token
    pooling, which runs its own forward pass on a scratch cache)."""
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0,
                           timeout=120)
    model = client.models.list().data[0].id
    reply = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12,
                                      temperature=0)
    embedding = client.embeddings.create(model=model, input="Once upon a time")
    return reply.choices[0].text, embedding.data[0].embedding


def _rank_pids(core_pid: int) -> list[int]:
    """The rank processes the engine core spawned (multiprocessing's spawn entry)."""
    pids = []
    for task in Path(f"/proc/{core_pid}/task").iterdir():
        try:
            kids = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for pid in map(int, kids):
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
            except FileNotFoundError:
                continue
    return pids


@pytest.fixture(scope="module")
def one_rank_answers(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
                     ) -> tuple[str, list[float]]:
    single = _serve(tiny_llama_dir, tmp_path_factory.mktemp("single") / "serve.log")
    try:
        return _answers(single)
    finally:
        single.stop()


def _assert_same_answers(server: EngineProcess, expected: tuple[str, list[float]]) -> None:
    text, vector = _answers(server)
    assert text == expected[0]
    # float32 partial sums over two ranks: equal up to summation order.
    assert torch.allclose(torch.tensor(vector), torch.tensor(expected[1]), atol=1e-5)


def test_two_ranks_serve_the_one_rank_answers_and_die_together(
    tiny_llama_dir: Path, tmp_path: Path, one_rank_answers: tuple[str, list[float]]
) -> None:
    log = tmp_path / "tp.log"
    server = _serve(tiny_llama_dir, log, "--tensor-parallel-size", "2")
    try:
        _assert_same_answers(server, one_rank_answers)
        core = children(server.process.pid)["core"]
        ranks = _rank_pids(core)
        assert len(ranks) == 1, ranks
        with grpc.insecure_channel(server.grpc_address) as channel:
            watch = HealthWatch(channel, READINESS)
            os.kill(ranks[0], signal.SIGKILL)
            code = server.process.wait(timeout=EXIT_BOUND_S)
            seen = watch.until_closed(EXIT_BOUND_S)
        assert code == 1
        assert NOT_SERVING in seen, seen
        errors = [line for line in log.read_text().splitlines() if " ERROR " in line]
        assert any("tp-rank-1 exited" in line for line in errors), errors
        wait_until(lambda: not live_group_members(server.process.pid), EXIT_BOUND_S,
                   "no process of engine-serve's group is left running")
    finally:
        server.stop()


def test_two_pipeline_stages_serve_the_one_rank_answers(
    tiny_llama_dir: Path, tmp_path: Path, one_rank_answers: tuple[str, list[float]]
) -> None:
    server = _serve(tiny_llama_dir, tmp_path / "pp.log", "--pipeline-parallel-size", "2")
    try:
        _assert_same_answers(server, one_rank_answers)
    finally:
        server.stop()
    assert server.process.returncode == 0


def test_a_headless_second_node_serves_rank_one_and_leaves_with_the_server(
    tiny_llama_dir: Path, tmp_path: Path, one_rank_answers: tuple[str, list[float]]
) -> None:
    """Two "machines" on loopback: node 0 serves, node 1 runs `--headless` (the multi-node
    code path: no rank of node 0 spawns rank 1)."""
    port = str(free_port())
    flags = ["--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1",
             "--master-port", port]
    with open(tmp_path / "node1.log", "wb") as node1_log:
        node1 = subprocess.Popen(
            [sys.executable, "-m", "protoserve.cli.serve", "--headless", "--node-rank", "1",
             "--model", str(tiny_llama_dir), "--dtype", "float32", "--kv-cache-memory", "64MiB",
             *flags], cwd=REPO_ROOT, start_new_session=True, stdout=node1_log,
            stderr=subprocess.STDOUT)
    try:
        server = _serve(tiny_llama_dir, tmp_path / "node0.log", *flags)
        try:
            _assert_same_answers(server, one_rank_answers)
        finally:
            server.stop()
        assert server.process.returncode == 0
        # Rank 0's STOP ends the headless node's rank, and the node with it.
        assert node1.wait(timeout=EXIT_BOUND_S) == 0, (tmp_path / "node1.log").read_text()
    finally:
        if node1.poll() is None:
            os.killpg(node1.pid, signal.SIGKILL)
            node1.wait()


def _headless_node(model_dir: Path, log: Path, flags: list[str]) -> subprocess.Popen:
    with open(log, "wb") as node_log:
        return subprocess.Popen(
            [sys.executable, "-m", "protoserve.cli.serve", "--headless", "--node-rank", "1",
             "--model", str(model_dir), "--dtype", "float32", "--kv-cache-memory", "64MiB",
             *flags], cwd=REPO_ROOT, start_new_session=True, stdout=node_log,
            stderr=subprocess.STDOUT)


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_an_idle_server_notices_a_dead_remote_rank(tiny_llama_dir: Path, tmp_path: Path,
                                                   fault: str) -> None:
    """Rank 0 watches only its own machine's rank processes; a rank on another machine that
    dies while no request runs is noticed by the idle heartbeat: NOT_SERVING and exit 1.
    Killed: its sockets close, the next heartbeat fails at once. Frozen (SIGSTOP, as a machine
    that stopped answering with its connections open): the heartbeat's timeout."""
    flags = ["--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1",
             "--master-port", str(free_port())]
    node1 = _headless_node(tiny_llama_dir, tmp_path / "node1.log", flags)
    log = tmp_path / "node0.log"
    try:
        server = _serve(tiny_llama_dir, log, *flags)
        try:
            with grpc.insecure_channel(server.grpc_address) as channel:
                watch = HealthWatch(channel, READINESS)
                # Node 1 (its engine-serve and its rank) is gone; node 0 runs no request.
                os.killpg(node1.pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
                code = server.process.wait(timeout=EXIT_BOUND_S)
                seen = watch.until_closed(EXIT_BOUND_S)
        finally:
            server.stop()
        assert code == 1, log.read_text()
        assert NOT_SERVING in seen, seen
        died = [line for line in log.read_text().splitlines() if "the engine died" in line]
        assert died and ("Connection closed" in died[0] if fault == "killed"
                         else "Rank 1 failed to pass monitoredBarrier" in died[0]), died
    finally:
        if node1.poll() is None:
            os.killpg(node1.pid, signal.SIGKILL)
            node1.wait()


def test_a_size_that_does_not_split_the_model_fails_start_up(tiny_llama_dir: Path,
                                                             tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with pytest.raises(RuntimeError, match="exited with 1"):
        _serve(tiny_llama_dir, log, "--tensor-parallel-size", "3").stop()
    text = log.read_text()
    assert "--tensor-parallel-size does not divide the model's 4 attention heads" in text, text
