"""Runs that never lose or mix results: output directories, locks, signals, file errors."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmeta.bench import (
    CheckpointError,
    Interrupted,
    OutDirError,
    RunLock,
    RunLocked,
    UnverifiedCheckpointWarning,
    benchmark,
    load_checkpoint,
    names,
    save_checkpoint,
)
from fastmeta.bench._config import fields_of
from fastmeta.bench._evaluate_checkpoint import evaluate_checkpoint
from fastmeta.bench._outdir import LOCK_NAME
from fastmeta.bench._registry import build_learner
from fastmeta.bench.daml import DamlConfig, run_daml
from fastmeta.bench.sine import SineConfig, run_sine
from fastmeta.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = {"iterations": 12, "meta_batch_size": 3, "train_shots": 4, "eval_shots": (3,),
        "eval_steps": 2, "eval_tasks": 6, "eval_query": 8, "checkpoint_every": 5}
CLI_TINY = ["--iterations", "12", "--meta-batch-size", "3", "--train-shots", "4",
            "--eval-shots", "3", "--eval-steps", "2", "--eval-tasks", "6", "--eval-query", "8",
            "--checkpoint-every", "5", "--no-plots", "--quiet"]


def _quiet(_: str) -> None:
    pass


def _sine(out: Path, *, resume: bool = False, **settings) -> dict:  # type: ignore[no-untyped-def]
    config = SineConfig(**{**TINY, **settings})
    return run_sine(config, out, resume=resume, progress=False, plots=False, log=_quiet)


def _states_equal(a: Path, b: Path) -> bool:
    one, two = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    return one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


# ---------------------------------------------------------------- the benchmark registry


@pytest.mark.parametrize("name", names())
def test_every_benchmark_follows_the_protocol(name):
    bench = benchmark(name)
    config = bench.quick_config()
    plans = bench.plan(config)
    assert plans and len({plan.name for plan in plans}) == len(plans)
    for plan in plans:
        assert plan.algorithm in bench.algorithms
        assert plan.spec["benchmark"] == name and plan.spec["algorithm"] == plan.algorithm
        build_learner(plan.spec, seed=0)  # every spec builds through the one registry
        assert bench.config.from_dict(plan.evaluation) is not None
    for field in fields_of(bench.config):
        assert field.help, field.name


@pytest.mark.parametrize("name", names())
def test_cli_help_shows_every_setting_with_its_default_from_the_config(name, capsys):
    with pytest.raises(SystemExit):
        main(["bench", name, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    bench = benchmark(name)
    for field in fields_of(bench.config):
        assert field.flag in text
    iterations = bench.config.__dataclass_fields__["iterations"].default
    assert f"(default: {iterations:,}; --quick: {bench.quick['iterations']:,})" in text
    assert f"--out OUT output directory (default: fastmeta-{name})" in text
    assert "seed" in text and "(default: 0)" in text and "(default: auto)" in text
    assert "--quick a short run: sets --iterations" in text


def test_digits_help_states_the_configurations_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "digits", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1,000; --quick: 200)" in text and "(default: 250; --quick: 100)" in text


# ---------------------------------------------------------------- output directories


def test_out_that_is_a_file_or_under_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutDirError, match=r"--out '.*file' is a file, not a directory"):
        _sine(tmp_path / "file", algorithms=("maml",))
    with pytest.raises(OutDirError, match=r"cannot be created: '.*file' is a file"):
        _sine(tmp_path / "file" / "run", algorithms=("maml",))
    assert main(["bench", "sine", "--algorithms", "maml", *CLI_TINY,
                 "--out", str(tmp_path / "file")]) == 1
    assert "is a file, not a directory; choose another --out" in capsys.readouterr().err


def test_an_output_file_that_is_a_directory_is_refused_before_training(tmp_path):
    (tmp_path / "results.json").mkdir(parents=True)
    with pytest.raises(OutDirError, match=r"'.*results.json' is a directory"):
        _sine(tmp_path, algorithms=("maml",))
    assert not list((tmp_path / "checkpoints").glob("*.pt"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_out_in_a_read_only_directory_is_refused_before_training(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutDirError, match=r"cannot be created \(Permission denied"):
            _sine(locked / "run", algorithms=("maml",))
    finally:
        locked.chmod(0o700)


def test_an_unwritable_out_is_refused_before_training_even_as_root(tmp_path, monkeypatch):
    import fastmeta.bench._outdir as outdir

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(outdir.tempfile, "mkstemp", refuse)  # the probe file
    with pytest.raises(OutDirError, match=r"cannot write in '.*run' \(Permission denied\); "
                       r"choose a directory you can write"):
        _sine(tmp_path / "run", algorithms=("maml",))


def test_a_live_lock_is_refused_naming_its_holder_and_a_dead_ones_is_taken_over(tmp_path):
    host = socket.gethostname()
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": os.getpid(), "host": host, "started": "2026-01-02T03:04:05+00:00",
         "command": "fastmeta bench sine"}))
    with pytest.raises(RunLocked, match=rf"in use by another fastmeta run: pid {os.getpid()} "
                       rf"on host '{host}', started 2026-01-02T03:04:05"):
        _sine(tmp_path, algorithms=("maml",))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": int(dead.stdout), "host": host, "started": "2026-01-02T03:04:05+00:00"}))
    lines: list[str] = []
    run_sine(SineConfig(**{**TINY, "algorithms": ("maml",)}), tmp_path, progress=False,
             plots=False, log=lines.append)
    assert any(f"took over the lock of a run that is gone (pid {int(dead.stdout)}" in line
               for line in lines)
    assert not (tmp_path / LOCK_NAME).exists()  # released at the end
    with RunLock(tmp_path) as lock, pytest.raises(RunLocked):
        RunLock(tmp_path).acquire()
    assert lock.took_over is None


def test_temporary_files_of_a_killed_run_are_removed(tmp_path):
    _sine(tmp_path, algorithms=("maml",), iterations=5)
    leftovers = [tmp_path / "checkpoints" / "maml.pt.k2j3h4.tmp",
                 tmp_path / "results.json.a8b9c0.tmp"]
    for path in leftovers:
        path.write_bytes(b"partial")
    lines: list[str] = []
    run_sine(SineConfig(**{**TINY, "algorithms": ("maml",), "iterations": 5}), tmp_path,
             resume=True, progress=False, plots=False, log=lines.append)
    assert not any(path.exists() for path in leftovers)
    assert sum("a temporary file of an interrupted write" in line for line in lines) == 2


def test_resume_with_a_conflicting_second_algorithm_trains_nothing(tmp_path):
    _sine(tmp_path, algorithms=("maml",))
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(CheckpointError, match=r"maml.pt' was written with a different "
                       r"configuration \(seed: 0 -> 1\)"):
        _sine(tmp_path, resume=True, seed=1, algorithms=("fomaml", "maml"))
    with pytest.raises(CheckpointError, match=r"maml.pt', another algorithm's checkpoint in "
                       r"this --out, was written with different settings \(seed: 0 -> 1\)"):
        _sine(tmp_path, resume=True, seed=1, algorithms=("fomaml",))
    assert not (tmp_path / "checkpoints" / "fomaml.pt").exists()
    assert (tmp_path / "results.json").read_text() == before


def test_resume_over_a_subset_merges_results_per_algorithm(tmp_path):
    first = _sine(tmp_path, algorithms=("maml", "fomaml"))
    _sine(tmp_path, resume=True, algorithms=("fomaml",))
    _sine(tmp_path, resume=True, algorithms=("reptile",))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["algorithms"]) == ["maml", "fomaml", "reptile"]
    assert saved["config"]["algorithms"] == ["maml", "fomaml", "reptile"]
    assert saved["algorithms"]["maml"]["evaluation"] == json.loads(
        json.dumps(first["algorithms"]["maml"]["evaluation"]))
    assert "| reptile |" in (tmp_path / "results.md").read_text()
    with pytest.raises(CheckpointError, match=r"holds maml, fomaml run with different settings "
                       r"\(eval_tasks: 6 -> 7\)"):
        _sine(tmp_path, resume=True, algorithms=("reptile",), eval_tasks=7)


def test_a_run_into_a_directory_with_results_but_no_checkpoints_needs_resume(tmp_path):
    _sine(tmp_path, algorithms=("random",))
    (tmp_path / "checkpoints" / "random.pt").unlink()
    with pytest.raises(FileExistsError, match="holds results.json from a run; pass --resume"):
        _sine(tmp_path, algorithms=("random",))


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def maml_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("maml")
    _sine(out, algorithms=("maml",))
    return out


class Pickled:
    """An object ``torch.load(weights_only=True)`` refuses."""


def _edited(source: Path, target: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    payload = load_checkpoint(source)
    edit(payload)
    payload = {k: v for k, v in payload.items() if k not in ("format", "format_version")}
    save_checkpoint(target, payload)
    return target


def _flipped(source: Path, target: Path) -> Path:
    """``source`` with the lowest mantissa byte of one weight flipped, as a bad disk would."""
    weight = load_checkpoint(source)["state_dict"]["module.body.0.weight"]
    data = bytearray(source.read_bytes())
    at = bytes(data).index(weight.numpy().tobytes())  # torch.save stores tensors uncompressed
    data[at] ^= 0x01  # little-endian float32: a change of about 1e-7 relative
    target.write_bytes(bytes(data))
    return target


def _bad_checkpoints(maml_run: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    good = maml_run / "checkpoints" / "maml.pt"
    folder.mkdir(parents=True, exist_ok=True)

    def relabel(payload):  # type: ignore[no-untyped-def]
        payload["spec"]["algorithm"] = "fomaml"

    def resize(payload):  # type: ignore[no-untyped-def]
        payload["state_dict"]["module.body.0.weight"] = torch.zeros(3, 1)

    torch.save({"learner": Pickled()}, folder / "objects.pt")
    truncated = folder / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    return {
        "flipped byte": (_flipped(good, folder / "flipped.pt"),
                         r".pt' is damaged: tensor 'state_dict/module.body.0.weight' "
                         r"no longer matches the SHA-256 digest written with it.*delete it "
                         r"and retrain"),
        "missing spec": (_edited(good, folder / "nospec.pt", lambda p: p.pop("spec")),
                         r"lacks its 'spec' entry \(how to rebuild the learner\)"),
        "relabelled": (_edited(good, folder / "relabelled.pt", relabel),
                       r"is labelled 'maml' but its spec builds 'fomaml'"),
        "size mismatch": (_edited(good, folder / "resized.pt", resize),
                          r"weights do not fit the 'maml' learner .*size mismatch"),
        "objects": (folder / "objects.pt",
                    r"holds Python objects other than tensors and plain data"),
        "truncated": (truncated, r"truncated, corrupt or another format"),
    }


@pytest.mark.parametrize("case", ["missing spec", "relabelled", "size mismatch", "objects",
                                  "truncated", "flipped byte"])
def test_eval_of_a_bad_checkpoint_names_the_file_and_the_problem(case, maml_run, tmp_path,
                                                                 capsys):
    path, message = _bad_checkpoints(maml_run, tmp_path)[case]
    with pytest.raises(CheckpointError, match=message):
        evaluate_checkpoint(path)
    assert main(["eval", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    assert "weights_only=False" not in err and "Re-running" not in err


@pytest.mark.parametrize("case", ["missing spec", "relabelled", "size mismatch", "truncated",
                                  "flipped byte"])
def test_resume_over_a_bad_checkpoint_is_refused_before_training(case, maml_run, tmp_path):
    path, message = _bad_checkpoints(maml_run, tmp_path / "bad")[case]
    out = tmp_path / "run"
    _sine(out, algorithms=("random",))
    (out / "checkpoints" / "maml.pt").write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match=message):
        _sine(out, resume=True, algorithms=("fomaml", "maml"))
    assert not (out / "checkpoints" / "fomaml.pt").exists()


def test_a_byte_flipped_in_the_pickled_spec_is_refused(maml_run, tmp_path):
    good = maml_run / "checkpoints" / "maml.pt"
    data = good.read_bytes()
    at = data.index(b"maml", data.index(b"algorithm"))
    (tmp_path / "spec.pt").write_bytes(data[:at] + b"mbml" + data[at + 4:])
    with pytest.raises(CheckpointError, match=r"spec.pt' is damaged: its spec no longer"):
        load_checkpoint(tmp_path / "spec.pt")


def test_a_bench_checkpoint_carries_the_example_shape(maml_run):
    from fastmeta.bench._registry import load_learner

    learner, _ = load_learner(maml_run / "checkpoints" / "maml.pt")
    assert learner.example_shape == (1,)  # sine inputs: one scalar per example
    x = torch.zeros(3, 5, 1)
    with pytest.raises(ValueError, match=r"x has shape \(3, 5, 1\): one leading dimension more"):
        learner.adapt(x, x)


def test_a_checkpoint_without_digests_loads_with_a_warning(maml_run, tmp_path):
    payload = load_checkpoint(maml_run / "checkpoints" / "maml.pt")
    del payload["digests"]
    torch.save({**payload, "format_version": 1}, tmp_path / "old.pt")  # an older release
    with pytest.warns(UnverifiedCheckpointWarning, match=r"old.pt' has no digests"):
        report = evaluate_checkpoint(tmp_path / "old.pt")
    assert report["iteration"] == 12


def test_eval_plot_into_a_file_is_refused_before_evaluating(maml_run, tmp_path, capsys):
    (tmp_path / "figures").write_text("not a directory")
    checkpoint = str(maml_run / "checkpoints" / "maml.pt")
    for out in (tmp_path / "figures", tmp_path / "figures" / "sub"):
        assert main(["eval", checkpoint, "--plot", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"--out {str(out)!r}: {str(tmp_path / 'figures')!r} is a file, but --plot " \
            f"writes its figures into a directory" in err and "Traceback" not in err


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="needs a device file")
def test_eval_of_a_device_file_says_it_is_not_a_regular_file(capsys):
    assert main(["eval", "/dev/null"]) == 1
    assert "'/dev/null' is not a fastmeta checkpoint: it is not a regular file (a device, " \
        "pipe or socket)" in capsys.readouterr().err


def test_eval_of_a_run_directory_lists_its_checkpoints(maml_run, capsys):
    assert main(["eval", str(maml_run)]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {str(maml_run)!r} is a directory; pass one of its checkpoint files " \
        f"({maml_run / 'checkpoints' / 'maml.pt'})" in err


def test_eval_of_a_partial_checkpoint_says_how_far_it_trained(tmp_path, capsys):
    with pytest.raises(Interrupted, match="stopped after meta-iteration 5 of 12"):
        run_sine(SineConfig(**{**TINY, "algorithms": ("maml",)}), tmp_path, progress=False,
                 plots=False, stop_after=5, log=_quiet)
    report = evaluate_checkpoint(tmp_path / "checkpoints" / "maml.pt")
    assert not report["complete"] and (report["iteration"], report["iterations"]) == (5, 12)
    assert main(["eval", str(tmp_path / "checkpoints" / "maml.pt")]) == 0
    assert "is a partial checkpoint: maml trained 5 of 12 meta-iterations" in (
        capsys.readouterr().out)


def test_eval_json_is_strict_json_with_non_finite_numbers_as_strings(tmp_path, capsys):
    _sine(tmp_path, algorithms=("random",), inner_lr=1e8)  # fine-tuning blows up
    assert main(["eval", str(tmp_path / "checkpoints" / "random.pt"), "--json"]) == 0
    text = capsys.readouterr().out

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-JSON constant {constant} in the output")

    report = json.loads(text, parse_constant=refuse)
    last = report["evaluation"]["curves"]["3"]["summaries"][-1]
    assert last["median"] in ("inf", "nan") and last["diverged"] > 0
    json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)


def test_eval_refuses_an_option_its_benchmark_does_not_take(tmp_path, capsys):
    run_daml(DamlConfig(iterations=2, eval_tasks=4), tmp_path, progress=False, plots=False,
             log=_quiet)
    assert main(["eval", str(tmp_path / "checkpoints" / "daml.pt"), "--shots", "5"]) == 1
    assert "--shots does not apply to `bench daml` checkpoints; it takes --steps, --tasks" in (
        capsys.readouterr().err)


# ---------------------------------------------------------------- DAML on the runner


def test_daml_resumes_to_the_numbers_of_an_uninterrupted_run_and_eval_reproduces_them(tmp_path):
    config = DamlConfig(iterations=6, eval_tasks=8, checkpoint_every=2)
    whole = run_daml(config, tmp_path / "whole", progress=False, plots=False, log=_quiet)
    with pytest.raises(Interrupted, match="stopped after meta-iteration 3 of 6"):
        run_daml(config, tmp_path / "split", progress=False, plots=False, stop_after=3,
                 log=_quiet)
    resumed = run_daml(config, tmp_path / "split", resume=True, progress=False, plots=False,
                       log=_quiet)
    a, b = whole["algorithms"]["daml"], resumed["algorithms"]["daml"]
    assert a["evaluation"] == b["evaluation"]  # the cosine schedule was restored too
    assert a["training"]["loss_curve"] == b["training"]["loss_curve"]
    assert _states_equal(tmp_path / "whole" / a["checkpoint"], tmp_path / "split" / b["checkpoint"])
    report = evaluate_checkpoint(tmp_path / "whole" / "checkpoints" / "daml.pt")
    assert report["evaluation"]["l1"] == json.loads(json.dumps(a["evaluation"]["l1"]))
    assert "mean L1 on the grid, after adaptation" in report["text"]


def test_without_matplotlib_daml_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises
    assert main(["bench", "daml", "--iterations", "2", "--eval-tasks", "4", "--quiet",
                 "--out", str(tmp_path / "run")]) == 1
    assert "need matplotlib: pip install 'fastmeta[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_evaluation_stops_at_once_and_keeps_the_checkpoints(
    signum, status, tmp_path, monkeypatch, capsys
):
    import fastmeta.bench.sine as sine

    calls = []

    def evaluate(learner, algorithm, config):  # type: ignore[no-untyped-def]
        calls.append(algorithm)
        os.kill(os.getpid(), signum)  # arrives while the real evaluation runs
        return sine.evaluate_learner(learner, config)

    monkeypatch.setattr(sine, "BENCHMARK", dataclasses.replace(sine.BENCHMARK,
                                                                evaluate=evaluate))
    args = ["bench", "sine", "--algorithms", "maml,fomaml", *CLI_TINY, "--out", str(tmp_path)]
    assert main(args) == status
    err = capsys.readouterr().err
    assert f"stopped during evaluation by {signal.Signals(signum).name}" in err
    assert "(after 0 of 2 learners)" in err and "are kept: rerun with --resume" in err
    assert calls == ["maml"] and not (tmp_path / "results.json").exists()
    assert all(load_checkpoint(tmp_path / "checkpoints" / f"{n}.pt")["complete"]
               for n in ("maml", "fomaml"))
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0  # evaluates without training again


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared: {process.communicate()}")
        time.sleep(0.02)


def test_sigterm_checkpoints_and_the_resumed_run_is_bit_identical(tmp_path, capsys):
    args = ["bench", "sine", "--algorithms", "maml", "--iterations", "800",
            "--meta-batch-size", "2", "--train-shots", "2", "--eval-shots", "2",
            "--eval-steps", "1", "--eval-tasks", "4", "--eval-query", "4",
            "--checkpoint-every", "10", "--no-plots", "--quiet"]
    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "fastmeta", *args, "--out", str(out)], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_for(out / "checkpoints" / "maml.pt", process)
        # A second run into the same --out while the first trains: refused, nothing touched.
        assert main([*args, "--out", str(out), "--resume"]) == 1
        assert f"is in use by another fastmeta run: pid {process.pid}" in capsys.readouterr().err
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, err
    stopped = load_checkpoint(out / "checkpoints" / "maml.pt")
    assert 10 <= stopped["iteration"] < 800 and not stopped["complete"]
    assert f"stopped by SIGTERM after meta-iteration {stopped['iteration']} of 800" in err
    assert not (out / LOCK_NAME).exists() and not list(out.rglob("*.tmp"))
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert _states_equal(out / "checkpoints" / "maml.pt", tmp_path / "whole" / "checkpoints" /
                         "maml.pt")
    resumed = json.loads((out / "results.json").read_text())["algorithms"]["maml"]
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())["algorithms"]["maml"]
    assert resumed["training"]["loss_curve"] == whole["training"]["loss_curve"]
    assert resumed["evaluation"] == whole["evaluation"]
