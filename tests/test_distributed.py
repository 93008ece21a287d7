"""Data-parallel meta-training: two gloo processes must equal one process on all their tasks.

The two-process runs launch tests/_distributed_worker.py twice with torchrun's environment
variables (a free port on 127.0.0.1), without torchrun's agent: so a rank that fails
must stop its peer by itself, as in a job started with ``init_process_group``. Each run
is bounded by ``TIMEOUT`` seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed as dist

import fastmeta
import fastmeta.distributed as fmd
from tests.conftest import make_task, tiny_mlp

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_distributed_worker.py"
TIMEOUT = 120  # seconds for a whole two-process run (each takes a few seconds)


def load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fastmeta_distributed_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(out: Path, *extra: str, world_size: int = 2) -> list[subprocess.CompletedProcess[str]]:
    """Run the worker on ``world_size`` processes; wait for all (at most ``TIMEOUT`` s)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),  # the package of this checkout, not an installed one
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "--out", str(out), *extra],
            cwd=ROOT,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world_size)
    ]
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()
        pytest.fail(f"the {world_size}-process run hung for more than {TIMEOUT} s")
    return results


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    for rank, run in enumerate(launch(out)):
        assert run.returncode == 0, f"rank {rank} failed:\n{run.stderr[-3000:]}"
    return out


@pytest.mark.parametrize("case", list(load_worker().CASES))
def test_two_processes_equal_one_process_on_the_union(two_process_runs: Path, case: str) -> None:
    worker = load_worker()
    ranks = [torch.load(two_process_runs / f"{case}-rank{r}.pt") for r in range(2)]
    single = worker.train(case)
    dtype = worker.CASES[case][2]
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert ranks[0]["state"].keys() == single["state"].keys()
    if case.startswith("metasgd"):
        assert any(k.startswith("inner_lrs.") for k in single["state"])
    for name, expected in single["state"].items():
        # identical on both ranks, bit for bit
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        torch.testing.assert_close(ranks[0]["state"][name], expected, rtol=0, atol=tol)
    initial = worker.build(case, seed=100)[0].state_dict()
    assert any(not torch.equal(initial[k], single["state"][k]) for k in initial)  # it trained
    assert ranks[0]["engine"] == ranks[1]["engine"]  # every rank runs the same engine
    if case == "maml-auto-split":
        assert ranks[0]["engine"] == "higher" and single["engine"] == "vmap"
    for run in ranks:  # every rank reports the global mean loss and every task's loss
        assert run["losses"] == pytest.approx(single["losses"], rel=0, abs=tol)
        for got, expected in zip(run["task_losses"], single["task_losses"]):
            assert got.shape == (worker.META_BATCH,)
            torch.testing.assert_close(got, expected, rtol=0, atol=tol)


def test_a_failing_rank_stops_every_rank_with_a_clear_error(tmp_path: Path) -> None:
    runs = launch(tmp_path, "--fail")
    for run in runs:
        # Divergence on rank 1 (a NaN target in its last task: task 4 of the meta-batch of
        # 5): the same DivergenceError on every rank, and the job can go on.
        expected = "DivergenceError: meta-step 2: the meta-loss is not finite: the support loss"
        assert f"{expected} of task 4 " in run.stdout
        assert run.returncode != 0
    # An exception in rank 1's inner loop: it re-raises its own, its peer stops too.
    assert "RuntimeError: injected failure in the inner loop of rank 1" in runs[1].stderr
    assert "RankFailedError: meta-step 2: rank(s) [1] of 2 raised" in runs[0].stderr


# ---------------------------------------------------------------------------- one process


def test_shard_bounds_split_unevenly_in_rank_order() -> None:
    assert [fmd.shard_bounds(5, rank=r, world_size=2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [fmd.shard_bounds(7, rank=r, world_size=3) for r in range(3)] == [
        (0, 3),
        (3, 5),
        (5, 7),
    ]


def test_shard_keeps_the_form_of_the_batch() -> None:
    task = make_task(tasks=5)
    parts = [fmd.shard(task, rank=r, world_size=2) for r in range(2)]
    assert all(isinstance(p, fastmeta.TaskBatch) for p in parts)
    for field in range(4):
        assert torch.equal(torch.cat([p[field] for p in parts]), task[field])
    batch = OrderedDict(train=[task.support_x, task.support_y], test=[task.query_x, task.query_y])
    part = fmd.shard(batch, rank=1, world_size=2)
    assert isinstance(part, OrderedDict) and list(part) == ["train", "test"]
    assert torch.equal(part["test"][1], task.query_y[3:])
    assert fmd.shard(task) is task  # not in a job: the whole batch


def test_shard_rejects_fewer_tasks_than_processes() -> None:
    with pytest.raises(ValueError, match=r"holds 1 task\(s\), fewer than the 2 processes"):
        fmd.shard(make_task(tasks=1), rank=0, world_size=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 2, "world_size": 2}, r"rank must be in \[0, world_size=2\), got 2"),
        ({"rank": 0, "world_size": 0}, r"world_size must be an integer >= 1, got 0"),
    ],
)
def test_shard_bounds_rejects_bad_ranks(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fmd.shard_bounds(4, **kwargs)


def test_outside_a_job_everything_is_one_process() -> None:
    assert not fmd.is_distributed()
    assert (fmd.rank(), fmd.world_size(), fmd.is_main_process()) == (0, 1, True)


def test_data_parallel_needs_an_initialised_process_group() -> None:
    learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1)
    with pytest.raises(RuntimeError, match=r"data_parallel: torch.distributed is not initial"):
        fmd.data_parallel(learner)
    with pytest.raises(TypeError, match="learner must be a fastmeta.MetaLearner, got Sequential"):
        fmd.data_parallel(tiny_mlp())  # type: ignore[arg-type]


def test_init_from_env_does_nothing_outside_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert fmd.init_from_env() is False
    assert not fmd.is_distributed()


def test_one_process_job_equals_no_job(tmp_path: Path) -> None:
    """A world of one: the hook's collectives must change nothing (float64, exact)."""
    task = make_task(tasks=3, dtype=torch.float64)
    plain = fastmeta.MetaSGD(tiny_mlp(), inner_lr=0.1, inner_steps=2)
    parallel = fastmeta.MetaSGD(tiny_mlp(), inner_lr=0.1, inner_steps=2)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        fmd.data_parallel(parallel)
        results = []
        for learner in (plain, parallel):
            optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
            results.append([learner.meta_step(task, optimizer) for _ in range(2)])
    finally:
        dist.destroy_process_group()
    assert [r.loss for r in results[0]] == [r.loss for r in results[1]]
    for a, b in zip(plain.state_dict().values(), parallel.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- SIGTERM to a torchrun job

SINE = ["bench", "sine", "--algorithms", "maml", "--iterations", "600", "--meta-batch-size",
        "2", "--train-shots", "2", "--eval-shots", "2", "--eval-steps", "1", "--eval-tasks",
        "4", "--eval-query", "4", "--checkpoint-every", "10", "--no-plots", "--quiet"]


def _bench_job(args: list[str]) -> list[subprocess.Popen[str]]:
    """``fastmeta ARGS`` on two gloo processes, with torchrun's environment variables."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-m", "fastmeta", *args], cwd=ROOT,
                             env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in range(2)]


def _finish(procs: list[subprocess.Popen[str]]) -> list[tuple[int, str]]:
    try:
        return [(p.wait(timeout=TIMEOUT), p.communicate()[1]) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the two-process run hung for more than {TIMEOUT} s")
    finally:
        for p in procs:
            p.kill()


@pytest.mark.slow
def test_sigterm_stops_both_ranks_together_and_resume_equals_an_uninterrupted_run(
        tmp_path: Path) -> None:
    from fastmeta.bench import load_checkpoint

    out = tmp_path / "interrupted"
    procs = _bench_job([*SINE, "--out", str(out)])
    checkpoint = out / "checkpoints" / "maml.pt"
    deadline = time.monotonic() + TIMEOUT
    while not checkpoint.exists():  # both ranks train, with their signal handlers set
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            pytest.fail(f"no checkpoint appeared: {[p.communicate() for p in procs]}")
        time.sleep(0.02)
    for p in procs:  # as torchrun's agent forwards it to every worker
        p.send_signal(signal.SIGTERM)
    (status0, err0), (status1, err1) = _finish(procs)
    assert (status0, status1) == (143, 143), (err0[-2000:], err1[-2000:])
    stopped = load_checkpoint(checkpoint)
    assert 10 <= stopped["iteration"] < 600 and not stopped["complete"]
    assert f"stopped by SIGTERM after meta-iteration {stopped['iteration']} of 600" in err0
    assert [p.name for p in checkpoint.parent.iterdir()] == ["maml.pt"]  # no partial file
    resumed = _finish(_bench_job([*SINE, "--out", str(out), "--resume"]))
    whole = _finish(_bench_job([*SINE, "--out", str(tmp_path / "whole")]))
    assert [s for s, _ in resumed + whole] == [0, 0, 0, 0], [e[-2000:] for _, e in resumed + whole]
    one = load_checkpoint(checkpoint)["state_dict"]
    two = load_checkpoint(tmp_path / "whole" / "checkpoints" / "maml.pt")["state_dict"]
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    results = [json.loads((d / "results.json").read_text())["algorithms"]["maml"]
               for d in (out, tmp_path / "whole")]
    assert results[0]["training"]["loss_curve"] == results[1]["training"]["loss_curve"]
    assert results[0]["evaluation"] == results[1]["evaluation"]



def test_the_console_script_leaves_a_distributed_run_with_os_exit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # After destroy_process_group, gloo could abort a rank during the interpreter's
    # finalization; a process that ran in a job skips it (its output flushed first).
    from fastmeta import cli

    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    with pytest.raises(SystemExit) as plain:
        cli.run()
    assert plain.value.code == 3 and exits == []  # no job: the usual exit
    monkeypatch.setattr(cli, "_left_a_process_group", True)
    with pytest.raises(SystemExit):
        cli.run()
    assert exits == [3]
