"""The benchmark runner and the command line: outputs, resume, eval, divergence, errors."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastmeta
from fastmeta.bench import Interrupted, Progress, TrainingDiverged, load_checkpoint, summarize
from fastmeta.bench._checkpoint import save_checkpoint
from fastmeta.bench._evaluate_checkpoint import evaluate_checkpoint
from fastmeta.bench._train import TrainingRun, train
from fastmeta.bench.digits import DigitsConfig, run_digits
from fastmeta.bench.sine import SINE_DEFAULT, SineConfig, run_sine
from fastmeta.cli import main

PNG = b"\x89PNG\r\n\x1a\n"

TINY = {
    "iterations": 12,
    "meta_batch_size": 3,
    "train_shots": 4,
    "eval_shots": (2, 3),
    "eval_steps": 2,
    "eval_tasks": 6,
    "eval_query": 8,
    "checkpoint_every": 5,
}


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def sine_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sine")
    results = run_sine(SineConfig(**TINY), out, progress=False, log=_quiet)
    return out, results


def test_bench_sine_writes_every_file_algorithm_and_cell(sine_run):
    out, results = sine_run
    for name in ("results.json", "results.md", "fine_tuning_curves.png", "fits.png",
                 "robustness.png"):
        assert (out / name).is_file(), name
    for figure in results["figures"]:
        assert (out / figure).read_bytes()[:8] == PNG
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["algorithms"]) == list(SINE_DEFAULT)
    for name, entry in saved["algorithms"].items():
        assert (out / entry["checkpoint"]).is_file()
        assert set(entry["evaluation"]["curves"]) == {"2", "3"}
        for curve in entry["evaluation"]["curves"].values():
            assert curve["steps"] == [0, 1, 2]
            for summary in curve["summaries"]:
                assert summary["tasks"] == 6
                assert set(summary) == {"mean", "ci95", "median", "diverged", "tasks", "bound"}
        expected = 0 if name == "random" else TINY["iterations"]
        assert entry["training"]["iterations"] == expected
    assert saved["config"]["iterations"] == TINY["iterations"]
    assert {"fastmeta", "torch", "python"} <= set(saved["versions"])
    assert saved["speed"]["first_order_over_second_order"] > 0
    markdown = (out / "results.md").read_text()
    assert "## K = 2 support points" in markdown and "| maml |" in markdown
    assert "| mamlpp |" in markdown
    assert "## Robustness" in markdown and "## Training speed" in markdown


def test_bench_sine_imaml_row_when_named(tmp_path):
    config = SineConfig(**{**TINY, "iterations": 3, "eval_shots": (2,)},
                        algorithms=("maml", "imaml"))
    results = run_sine(config, tmp_path, progress=False, plots=False, log=_quiet)
    assert list(results["algorithms"]) == ["maml", "imaml"]
    assert "| imaml |" in (tmp_path / "results.md").read_text()
    assert "imaml" not in SineConfig().algorithms and "mamlpp" in SineConfig().algorithms


def test_every_algorithm_starts_from_the_same_weights(sine_run):
    out, _ = sine_run
    random = load_checkpoint(out / "checkpoints" / "random.pt")["state_dict"]
    torch.manual_seed(0)
    initial = fastmeta.models.SineMLP().state_dict()
    assert all(torch.equal(v, initial[k.removeprefix("module.")]) for k, v in random.items()
               if k != "_extra_state")  # the learner's example shape


def test_eval_reproduces_the_numbers_bench_wrote(sine_run):
    out, results = sine_run
    for algorithm in ("maml", "metasgd", "transfer"):
        report = evaluate_checkpoint(out / "checkpoints" / f"{algorithm}.pt")
        written = json.loads(json.dumps(results["algorithms"][algorithm]["evaluation"]["curves"]))
        assert report["evaluation"]["curves"] == written
        assert report["complete"] and report["algorithm"] == algorithm


def test_eval_command_prints_the_table_and_plots(sine_run, tmp_path, capsys):
    out, _ = sine_run
    code = main(["eval", str(out / "checkpoints" / "maml.pt"), "--shots", "3", "--steps", "1",
                 "--plot", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "maml, K=3: query MSE" in printed and "1 steps" in printed
    assert (tmp_path / "eval_maml_curves.png").read_bytes()[:8] == PNG
    assert (tmp_path / "eval_maml_fits_K3.png").read_bytes()[:8] == PNG  # K = --shots


def test_resumed_run_ends_with_the_same_numbers(tmp_path):
    config = SineConfig(**{**TINY, "algorithms": ("maml", "reptile", "metasgd", "transfer")})
    whole = run_sine(config, tmp_path / "whole", progress=False, plots=False, log=_quiet)
    with pytest.raises(Interrupted, match="stopped after meta-iteration 7 of 12"):
        run_sine(config, tmp_path / "split", progress=False, plots=False, stop_after=7,
                 log=_quiet)
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "maml.pt")["iteration"] == 7
    resumed = run_sine(config, tmp_path / "split", resume=True, progress=False, plots=False,
                       log=_quiet)
    for name in config.algorithms:
        a, b = whole["algorithms"][name], resumed["algorithms"][name]
        assert a["evaluation"] == b["evaluation"], name
        assert a["training"]["loss_curve"] == b["training"]["loss_curve"], name
        state_a = load_checkpoint(tmp_path / "whole" / a["checkpoint"])["state_dict"]
        state_b = load_checkpoint(tmp_path / "split" / b["checkpoint"])["state_dict"]
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a), name


def test_bench_refuses_to_overwrite_a_run_without_resume(sine_run):
    out, _ = sine_run
    with pytest.raises(FileExistsError, match="pass --resume"):
        run_sine(SineConfig(**TINY), out, progress=False, log=_quiet)


def test_resume_with_changed_training_settings_is_refused(tmp_path):
    config = SineConfig(**{**TINY, "algorithms": ("fomaml",)})
    run_sine(config, tmp_path, progress=False, plots=False, log=_quiet)
    changed = SineConfig(**{**TINY, "algorithms": ("fomaml",), "inner_lr": 0.02})
    with pytest.raises(ValueError, match=r"different configuration \(inner_lr: 0.01 -> 0.02\)"):
        run_sine(changed, tmp_path, resume=True, progress=False, plots=False, log=_quiet)


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    learner = fastmeta.MAML(fastmeta.models.SineMLP(hidden=(8,)), inner_lr=0.01)
    good = fastmeta.TaskBatch(*(torch.randn(2, 4, 1) for _ in range(4)))
    poisoned = good._replace(query_y=torch.full((2, 4, 1), math.nan))
    run = TrainingRun(
        "maml", learner, torch.optim.Adam(learner.parameters(), lr=1e-3), 10,
        lambda i: poisoned if i == 5 else good, tmp_path / "maml.pt", {}, {},
    )
    with pytest.raises(TrainingDiverged, match=r"diverged at meta-iteration 6.*last good "
                       r"checkpoint \(meta-iteration 4\)"):
        train(run, checkpoint_every=2, progress=False)
    assert load_checkpoint(tmp_path / "maml.pt")["iteration"] == 4


def test_summarize_counts_diverged_tasks_instead_of_returning_inf():
    summary = summarize([1.0, 3.0, math.inf, math.nan, 2.0])
    assert summary["diverged"] == 2 and summary["tasks"] == 5
    assert summary["mean"] == pytest.approx(2.0)
    assert summary["ci95"] == pytest.approx(1.96 * 1.0 / math.sqrt(3))
    assert summary["median"] == 3.0  # diverged tasks rank above every finite one
    assert summarize([math.inf])["mean"] is None


def test_progress_redraws_on_a_terminal_and_logs_tenths_elsewhere():
    log = io.StringIO()
    bar = Progress(100, "maml", stream=log)
    for i in range(1, 101):
        bar.update(i, loss=1.0 / i)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in log.getvalue()
    assert lines[-1].startswith("maml: 100/100 (100%)") and "ETA" in lines[-1]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    bar = Progress(5, "fomaml", stream=screen)
    bar.update(5, loss=0.5)
    bar.close()
    assert screen.getvalue().startswith("\rfomaml: 5/5") and "loss 0.5" in screen.getvalue()
    silent = io.StringIO()
    Progress(5, "x", stream=silent, enabled=False).update(5)
    assert silent.getvalue() == ""


def test_checkpoint_is_written_atomically_and_validated(tmp_path):
    save_checkpoint(tmp_path / "a.pt", {"state_dict": {"w": torch.ones(2)}})
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left
    assert torch.equal(load_checkpoint(tmp_path / "a.pt")["state_dict"]["w"], torch.ones(2))
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="is not a fastmeta checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a file that torch.save wrote"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"iterations": 0}, "iterations must be >= 1, got 0"),
        ({"algorithms": ("maml", "mamba")}, r"unknown \['mamba'\]"),
        ({"preset": "harmonic"}, "preset must be one of maml, reptile, got 'harmonic'"),
        ({"inner_lr": -1.0}, "inner-lr must be > 0"),
        ({"eval_shots": (0,)}, "eval-shots must be integers >= 1"),
    ],
)
def test_sine_config_errors_name_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        SineConfig(**settings)


def test_cli_reports_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "sine", "--algorithms", "maml,foo"])
    assert exit_info.value.code == 2
    assert "unknown algorithm(s) ['foo']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "sine", "--eval-shots", "5,x"])
    assert "comma-separated integers" in capsys.readouterr().err


def test_cli_bench_sine_runs_and_refuses_to_overwrite(tmp_path, capsys):
    args = ["bench", "sine", "--algorithms", "fomaml,random", "--iterations", "3",
            "--meta-batch-size", "2", "--eval-tasks", "4", "--eval-shots", "2", "--eval-steps",
            "1", "--no-plots", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(args) == 1
    assert "pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0


def test_eval_command_on_a_missing_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "none.pt")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_python_dash_m_fastmeta_prints_its_version():
    done = subprocess.run([sys.executable, "-m", "fastmeta", "--version"], capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == f"fastmeta {fastmeta.__version__}"


def test_bench_digits_writes_accuracy_for_every_algorithm_and_shot(tmp_path):
    config = DigitsConfig(iterations=2, meta_batch_size=2, eval_tasks=4, eval_steps=1,
                          hidden=4, query=2, checkpoint_every=1,
                          algorithms=("maml", "mamlpp", "imaml", "finetune"))
    results = run_digits(config, tmp_path, progress=False, log=_quiet)
    assert (tmp_path / "accuracy_curves.png").read_bytes()[:8] == PNG
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["algorithms"]) == list(config.algorithms)
    for entry in saved["algorithms"].values():
        assert set(entry["evaluation"]) == {"1-shot", "5-shot"}
        for curve in entry["evaluation"].values():
            assert all(0.0 <= s["mean"] <= 1.0 for s in curve["summaries"])
    text = (tmp_path / "results.md").read_text()
    assert "| finetune |" in text and "| mamlpp |" in text and "| imaml |" in text
    imaml = load_checkpoint(tmp_path / saved["algorithms"]["imaml"]["checkpoints"]["imaml-1shot"])
    assert imaml["spec"]["learner"]["lam"] == 2.0 and imaml["spec"]["learner"]["inner_steps"] == 5
    checkpoint = saved["algorithms"]["maml"]["checkpoints"]["maml-1shot"]
    report = evaluate_checkpoint(tmp_path / checkpoint)
    assert report["evaluation"]["1-shot"] == results["algorithms"]["maml"]["evaluation"]["1-shot"]


@pytest.mark.slow
def test_bench_sine_under_torchrun_matches_one_process(tmp_path):
    common = ["bench", "sine", "--algorithms", "maml,metasgd", "--iterations", "6",
              "--meta-batch-size", "5", "--eval-tasks", "8", "--eval-shots", "3",
              "--eval-steps", "2", "--no-plots", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "fastmeta"]
    root = Path(__file__).resolve().parents[1]
    subprocess.run([*torchrun, *common, "--out", str(tmp_path / "two")], check=True,
                   timeout=300, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    one = json.loads((tmp_path / "one" / "results.json").read_text())["algorithms"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["algorithms"]
    assert not (tmp_path / "two" / "checkpoints" / "maml.pt.tmp").exists()
    for name in ("maml", "metasgd"):
        for a, b in zip(one[name]["evaluation"]["curves"]["3"]["summaries"],
                        two[name]["evaluation"]["curves"]["3"]["summaries"], strict=True):
            assert a["mean"] == pytest.approx(b["mean"], rel=1e-4)


@pytest.mark.slow
def test_bench_daml_under_torchrun_matches_one_process(tmp_path):
    common = ["bench", "daml", "--iterations", "4", "--meta-batch-size", "6", "--eval-tasks",
              "8", "--checkpoint-every", "2", "--no-plots", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "fastmeta"]
    root = Path(__file__).resolve().parents[1]
    subprocess.run([*torchrun, *common, "--out", str(tmp_path / "two")], check=True,
                   timeout=300, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    one = json.loads((tmp_path / "one" / "results.json").read_text())["algorithms"]["daml"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["algorithms"]["daml"]
    assert two["training"]["iterations"] == 4
    assert one["evaluation"]["l1"]["mean"] == pytest.approx(two["evaluation"]["l1"]["mean"],
                                                             rel=1e-4)


def test_cli_bench_daml_writes_its_results(tmp_path, capsys):
    assert main(["bench", "daml", "--iterations", "3", "--eval-tasks", "4", "--quiet",
                 "--out", str(tmp_path)]) == 0
    assert "daml_sine.png" in capsys.readouterr().out
    assert (tmp_path / "daml_sine.png").read_bytes()[:8] == PNG
    assert "# DAML on sine waves" in (tmp_path / "results.md").read_text()
    assert load_checkpoint(tmp_path / "checkpoints" / "daml.pt")["iteration"] == 3
