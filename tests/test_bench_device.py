"""``--device`` and ``--precision`` of every ``fastmeta bench`` command and of ``eval``."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

import fastmeta
from fastmeta.bench import names
from fastmeta.bench._device import process_group_backend, resolve_device, to_device
from fastmeta.cli import _parser, main


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    return monkeypatch


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    return monkeypatch


def test_auto_is_the_cpu_without_a_gpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")


def test_auto_prefers_cuda_then_mps(two_gpus):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    two_gpus.setattr(torch.cuda, "is_available", lambda: False)
    two_gpus.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


def test_under_torchrun_each_rank_keeps_its_local_gpu(two_gpus):
    two_gpus.setenv("RANK", "3")
    two_gpus.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert process_group_backend(resolve_device("auto")) == "nccl"
    assert process_group_backend(torch.device("cpu")) == "gloo"


def test_a_device_this_machine_lacks_is_refused_with_the_fix(no_gpu, two_gpus):
    with pytest.raises(ValueError, match=r"--device cuda:2: this machine has 2 CUDA device"):
        resolve_device("cuda:2")
    two_gpus.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"--device cuda: CUDA is not available.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"--device mps: Apple's MPS backend is not available"):
        resolve_device("mps")
    with pytest.raises(ValueError, match=r"--device must be one of auto, cpu, cuda.*got 'tpu'"):
        resolve_device("tpu")


def test_batches_follow_the_device_in_their_own_structure():
    batch = {"train": [torch.ones(2, 3, 1), torch.zeros(2, 3, 1)],
             "test": (torch.ones(2, 4, 1), torch.zeros(2, 4, dtype=torch.long))}
    assert to_device(batch, torch.device("cpu")) is batch  # nothing to copy
    moved = to_device(batch, torch.device("meta"))
    assert isinstance(moved["train"], list) and isinstance(moved["test"], tuple)
    assert all(t.device.type == "meta" for part in moved.values() for t in part)
    assert moved["test"][1].dtype == torch.long
    task = fastmeta.TaskBatch(*(torch.ones(2, 3, 1) for _ in range(4)))
    moved_task = to_device(task, torch.device("meta"))
    assert isinstance(moved_task, fastmeta.TaskBatch) and moved_task.query_y.is_meta


@pytest.mark.parametrize("name", names())
def test_every_bench_command_takes_device_and_precision(name):
    args = _parser().parse_args(["bench", name, "--device", "cpu", "--precision", "bf16"])
    assert (args.device, args.precision) == ("cpu", "bf16")
    defaults = _parser().parse_args(["bench", name])
    assert (defaults.device, defaults.precision) == ("auto", "fp32")


def test_eval_takes_device_and_precision():
    args = _parser().parse_args(["eval", "x.pt", "--device", "cpu", "--precision", "fp16"])
    assert (args.device, args.precision) == ("cpu", "fp16")
    assert _parser().parse_args(["eval", "x.pt"]).precision is None  # the checkpoint's


def test_an_unknown_precision_is_refused_by_the_command_line(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "sine", "--precision", "fp8"])
    assert "--precision: invalid choice: 'fp8'" in capsys.readouterr().err


def test_a_missing_device_is_refused_before_anything_runs(tmp_path, no_gpu, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "sine", "--device", "cuda", "--out", str(tmp_path / "run")])
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_bf16_sine_run_on_the_cpu_learns_and_records_device_and_precision(tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["bench", "sine", "--quick", "--precision", "bf16", "--device", "cpu",
                 "--algorithms", "maml,random", "--iterations", "300", "--meta-batch-size",
                 "25", "--eval-shots", "10", "--eval-steps", "1", "--eval-tasks", "20",
                 "--eval-query", "20", "--no-plots", "--quiet", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (results["device"], results["precision"]) == ("cpu", "bf16")
    maml = results["algorithms"]["maml"]
    curve = [loss for _, loss in maml["training"]["loss_curve"]]
    assert statistics.fmean(curve[-50:]) < 0.85 * statistics.fmean(curve[:50])
    after_one_step = {name: entry["evaluation"]["curves"]["10"]["summaries"][1]["mean"]
                      for name, entry in results["algorithms"].items()}
    assert after_one_step["maml"] < 0.8 * after_one_step["random"]  # on the same tasks
    assert maml["training"]["skipped_steps"] == 0

    capsys.readouterr()
    checkpoint = str(out / "checkpoints" / "maml.pt")
    assert main(["eval", checkpoint, "--json"]) == 0  # the checkpoint's own precision
    report = json.loads(capsys.readouterr().out)
    assert (report["device"], report["precision"]) == ("cpu", "bf16")
    again = report["evaluation"]["curves"]["10"]["summaries"][1]["mean"]
    assert again == after_one_step["maml"]  # eval reproduces the bf16 numbers
    assert main(["eval", checkpoint, "--json", "--precision", "fp32", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "fp32"
    assert report["evaluation"]["curves"]["10"]["summaries"][1]["mean"] != again
