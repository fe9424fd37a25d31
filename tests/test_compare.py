"""`learnopt compare` and the W&B logging schema: real offline runs made by `learnopt evaluate` and
`learnopt meta-train`, read back and checked against the numbers the runs logged; the speedup on
hand-made curves; the offline reader against W&B's own `wandb leet inspect`; the sweep configs
run the way `wandb agent` runs them."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import pytest
import torch
import wandb
import yaml

import learnopt
from learnopt import logging_schema as ls
from learnopt.cli import main
from learnopt.compare import (
    RunReadError,
    compare,
    find_run_logs,
    read_offline_run,
    read_online_runs,
    speedup,
    steps_to_reach,
)

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- speedup


def test_speedup_on_hand_made_curves():
    adam = [-float(t) for t in range(11)]  # 0, -1, ..., -10: reaches its final -10 at step 10
    fast = [-2.0 * t for t in range(6)] + [-10.5] * 5  # reaches -10 at step 5, ends better
    slow = [-0.5 * t for t in range(11)]  # ends at -5, which Adam reaches at step 5
    assert steps_to_reach(adam, -3.5) == 4 and steps_to_reach(adam, -11) is None
    assert speedup(fast, adam) == 2.0  # Adam needs 10 steps for what `fast` does in 5
    assert speedup(slow, adam) == 0.5  # Adam needs 5 steps for what `slow` does in 10
    assert speedup(adam, adam) == 1.0
    assert speedup(adam, fast) == pytest.approx(1 / speedup(fast, adam))
    # a plateau: the optimizer first reaches Adam's final at step 2 and stays there
    assert speedup([0.0, -5.0, -10.0, -10.0, -10.0], [0.0, -2.5, -5.0, -7.5, -10.0]) == 2.0


def test_speedup_edge_cases_diverged_and_no_progress():
    adam = [0.0, -1.0, -2.0]
    assert speedup([0.0, 1.0, math.inf], adam) == 0.0  # diverged
    assert speedup([0.0, 0.5, 0.0], adam) == 0.0  # ended where it started: no progress
    assert speedup([0.0, -1.0, -2.0], [0.0, 1.0, math.nan]) == math.inf  # the reference diverged
    assert speedup([0.0, -1.0, -2.0], [0.0, 0.5, 0.2]) == math.inf  # the reference made no progress
    with pytest.raises(ValueError, match="non-empty"):
        speedup([], adam)


def _record(run_id, optimizer, seeds, seed_values, curve, steps=2, **config):
    from learnopt.compare import RunRecord

    history = [{ls.INNER_STEP: t, ls.INNER_LOSS: v} for t, v in enumerate(curve)]
    summary = {ls.FINAL_LOG10: sum(seed_values) / len(seed_values), ls.SEED_LOG10: seed_values}
    return RunRecord(run_id, run_id, "learnopt", "g", "evaluate", [],
                     {"optimizer": optimizer, "task": "t", "steps": steps, "seeds": seeds, **config},
                     summary, history)


def test_pooling_counts_a_re_evaluated_seed_once_and_keeps_step_counts_apart():
    from learnopt.compare import build_comparison

    runs = [
        _record("a1", "adam", [0, 1], [-1.0, -2.0], [0.0, -1.0, -1.5]),
        _record("a2", "adam", [1, 2], [-3.0, -4.0], [0.0, -2.0, -3.5]),  # seed 1 again: replaces a1's
        _record("a3", "adam", [1], [-5.0], [0.0, -3.0, -5.0]),  # and again: a2 keeps only seed 2
        _record("b1", "adam", [0], [-9.0], [0.0, -5.0, -7.0, -9.0], steps=3),  # another horizon: its own row
    ]
    rows = {(r.optimizer, r.steps): r for r in build_comparison(runs).rows}
    row = rows[("adam", 2)]
    assert row.seed_values == {"seed 0": -1.0, "seed 2": -4.0, "seed 1": -5.0}
    assert row.mean == pytest.approx(-10.0 / 3)
    # the curve weighs each run by the seeds it still provides: a1 one, a2 one, a3 one
    assert row.curve == pytest.approx([0.0, -2.0, -10.0 / 3])
    assert rows[("adam", 3)].seed_values == {"seed 0": -9.0} and rows[("adam", 3)].speedup == 1.0
    # a run whose seeds were all re-evaluated later adds nothing
    rows = build_comparison(runs[:1] + [_record("a4", "adam", [0, 1], [-7.0, -8.0], [0.0, -4.0, -7.5])]).rows
    assert rows[0].runs == ["a4"] and rows[0].curve == pytest.approx([0.0, -4.0, -7.5])


# --------------------------------------------------------------------------- reading offline runs


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


def _one_run(save_dir: Path, **config) -> str:
    run = ls.init_run("benchmark", group="g1", tags=["x", "y"], save_dir=save_dir, name="g1/opt",
                      config={"optimizer": "opt", "task": "t", "kind": "baseline", "lr": 0.1, "seeds": [0, 1],
                              "nested": {"a": [1, 2]}, **config})
    ls.log_inner_curve(run, [1.0, 0.5, 0.25, -1.5])
    ls.log_final(run, {ls.FINAL_LOG10: -1.5, ls.SEED_LOG10: [-1.25, -1.75], "nested": {"deep": 3}})
    run.config.update({"late": "added"})
    run_dir = str(Path(run.dir).parent)
    ls.finish_run(run)
    return run_dir


def test_transaction_log_reader_returns_what_was_logged_and_agrees_with_wandb_leet(offline):
    run_dir = _one_run(offline / "runs")
    run = read_offline_run(run_dir)
    assert (run.name, run.group, run.job_type, run.tags, run.exit_code) == ("g1/opt", "g1", "benchmark", ["x", "y"], 0)
    assert run.config["nested"] == {"a": [1, 2]} and run.config["late"] == "added" and run.config["lr"] == 0.1
    assert run.curve(ls.INNER_LOSS, ls.INNER_STEP) == ([0.0, 1.0, 2.0, 3.0], [1.0, 0.5, 0.25, -1.5])
    assert run.summary[ls.FINAL_LOG10] == -1.5 and run.summary[ls.SEED_LOG10] == [-1.25, -1.75]
    assert run.summary["nested"] == {"deep": 3}
    # W&B's own reader of the same log (wandb leet inspect --json) sees the same run
    leet = read_offline_run(run_dir, backend="leet")
    assert (leet.name, leet.group, leet.job_type, leet.tags) == (run.name, run.group, run.job_type, run.tags)
    assert leet.config == run.config
    assert leet.curve(ls.INNER_LOSS, ls.INNER_STEP) == run.curve(ls.INNER_LOSS, ls.INNER_STEP)
    for key in (ls.FINAL_LOG10, ls.SEED_LOG10, "nested"):
        assert leet.summary[key] == run.summary[key]


def test_reader_names_the_file_and_the_problem(offline, capsys):
    run_dir = Path(_one_run(offline / "runs"))
    log = next(run_dir.glob("*.wandb"))
    bad = offline / "bad.wandb"
    bad.write_bytes(b"not a wandb log at all")
    with pytest.raises(RunReadError, match="bad.wandb: not a W&B transaction log"):
        read_offline_run(bad)
    corrupt = offline / "corrupt.wandb"
    data = bytearray(log.read_bytes())
    data[200] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with pytest.raises(RunReadError, match="corrupt.wandb: corrupt record"):
        read_offline_run(corrupt)
    with pytest.raises(RunReadError, match="no such"):
        find_run_logs([offline / "missing"])
    (offline / "empty").mkdir()
    with pytest.raises(RunReadError, match="holds no W&B runs"):
        find_run_logs([offline / "empty"])
    # a run directory, the wandb/ folder and the folder above it all lead to the same log
    assert find_run_logs([run_dir]) == find_run_logs([offline / "runs/wandb"]) == find_run_logs([offline / "runs"])
    # among several runs a damaged one is skipped with its reason; alone it is an error
    damaged = offline / "runs/wandb/offline-run-damaged"
    damaged.mkdir()
    (damaged / "run-damaged.wandb").write_bytes(bytes(data))
    comparison, _ = compare([offline / "runs"], out_dir=None)
    assert [r.optimizer for r in comparison.rows] == ["opt"]
    assert "skipping a run: " in capsys.readouterr().err
    with pytest.raises(RunReadError, match="run-damaged.wandb: corrupt record"):
        compare([damaged], out_dir=None)


def test_online_project_without_login_is_a_clear_error_not_a_prompt(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(RuntimeError, match="needs a W&B login"):
        read_online_runs("someone/learnopt")


def test_init_run_is_offline_without_credentials_and_checks_job_type(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert ls.wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password abc\n")
    assert ls.wandb_mode() == "online"
    with pytest.raises(ValueError, match="job_type"):
        ls.init_run("training", save_dir=tmp_path)


# --------------------------------------------------------------------------- end to end

TINY_META_TRAIN = [
    "meta-train", "--model.estimator.num_tasks", "8", "--model.estimator.horizon", "10",
    "--model.estimator.unroll_length", "5",
    "--model.val_tasks", "8", "--model.learned_optimizer.init_args.hidden_size", "4",
    "--model.task_family.init_args.dim", "10", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
    "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.group", "mt",
    "--trainer.logger.init_args.tags", "[tiny]",
]
EVAL_ARGS = [
    "--task_family.init_args.dim", "10", "--steps", "10", "--num_instances", "4", "--seeds", "[0, 1, 2]",
    "--baselines", "[sgd, adam]", "--lr_grid", "[0.01, 0.1]", "--tune_instances", "4",
]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """One tiny meta-training run and two evaluations (of its checkpoint, and of the baselines
    alone on other seeds), all through the `learnopt` command, logged offline to W&B."""
    root = tmp_path_factory.mktemp("experiment")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(root))
        assert main(TINY_META_TRAIN) == 0
        ls.finish_run(wandb.run)  # Lightning leaves the run open until the process ends
        ckpt = "runs/meta-train/learned_optimizer.pt"
        assert main(["evaluate", "--checkpoint", ckpt, *EVAL_ARGS, "--out_dir", "ev1", "--group", "ev1",
                     "--tags", "[tiny, learned]"]) == 0
        assert main(["evaluate", *EVAL_ARGS, "--seeds", "[3]", "--out_dir", "ev2", "--group", "ev2",
                     "--tags", "[tiny]"]) == 0
    return root


def _compare(root: Path, *args: str, capsys) -> str:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        capsys.readouterr()
        assert main(["compare", "runs", *args]) == 0
        return capsys.readouterr().out
    finally:
        os.chdir(cwd)


def test_compare_table_matches_what_the_evaluate_runs_logged(experiment, capsys):
    from scipy.stats import t as student_t

    out = _compare(experiment, "--group", "ev1", "--format", "json", "--out_dir", "cmp1", capsys=capsys)
    table = json.loads(out)
    raw = json.loads((experiment / "ev1/results.json").read_text())["results"]
    rows = {r["optimizer"]: r for r in table["evaluation"]}
    assert set(rows) == {"learned_optimizer", "sgd", "adam"} and table["meta_train"] == []
    for name, r in rows.items():
        logged = raw[name]
        assert r["task"] == "quadratic10_gaussian" and r["seeds"] == 3
        assert list(r["seed_mean_log10_losses"].values()) == pytest.approx(logged["seed_means"])
        # equal instances per seed: the mean over seeds is the mean over all instances
        assert r["mean_log10_final_loss"] == pytest.approx(logged["mean_log10_final_loss"])
        x = torch.tensor(logged["seed_means"], dtype=torch.float64)
        half = student_t.ppf(0.975, 2) * float(x.std(unbiased=True)) / math.sqrt(3)
        assert r["ci95"] == pytest.approx(half)
        assert r["mean_log10_normalized_loss"] == pytest.approx(logged["mean_log10_normalized_loss"])
        assert r["lr"] == logged["lr"] or (r["lr"] == [] and logged["lr"] is None)
        # speedup from the curves as logged, the same number evaluate put in its table and the run summary
        assert r["speedup_vs_reference"] == pytest.approx(logged["speedup_vs_adam"])
        assert r["speedup_vs_reference"] == pytest.approx(
            speedup(logged["curve_mean_log10_loss"], raw["adam"]["curve_mean_log10_loss"]))
        assert r["time_per_step_s"] > 0
    assert rows["adam"]["speedup_vs_reference"] == 1.0
    # the normalised loss is log10 of loss / loss_scale, the quadratic's expected initial loss
    finals = torch.tensor(raw["sgd"]["final_losses"], dtype=torch.float64)
    scale = 10 * (1 + 10 * 0.01 ** 2)
    assert rows["sgd"]["mean_log10_normalized_loss"] == pytest.approx(float(torch.log10(finals / scale).mean()))
    for png in ("cmp1/curves_quadratic10_gaussian.png", "cmp1/index.html"):
        assert (experiment / png).stat().st_size > 1000
    page = (experiment / "cmp1/index.html").read_text()
    assert "data:image/png;base64" in page and "learned_optimizer" in page and "learnopt compare runs" in page


def test_compare_pools_seeds_across_groups_and_reads_meta_training(experiment, capsys):
    out = _compare(experiment, "--tag", "tiny", "--format", "csv", "--out_dir", "cmp2", capsys=capsys)
    eval_part, meta_part = out.split("\n\n")
    rows = {r["optimizer"]: r for r in csv.DictReader(io.StringIO(eval_part))}
    ev1 = json.loads((experiment / "ev1/results.json").read_text())["results"]
    ev2 = json.loads((experiment / "ev2/results.json").read_text())["results"]
    # adam: seeds 0-2 from ev1 and seed 3 from ev2, pooled into one row of 4 seeds
    assert rows["adam"]["seeds"] == "4" and rows["learned_optimizer"]["seeds"] == "3"
    pooled = ev1["adam"]["seed_means"] + ev2["adam"]["seed_means"]
    assert float(rows["adam"]["mean_log10_final_loss"]) == pytest.approx(sum(pooled) / 4)
    meta = list(csv.DictReader(io.StringIO(meta_part)))
    assert len(meta) == 1 and meta[0]["group"] == "mt" and meta[0]["meta_steps"] == "4"
    ckpt = learnopt.load(experiment / "runs/meta-train/learned_optimizer.pt")
    validation = ckpt.checkpoint_metadata["validation"]
    assert float(meta[0]["best_val_log10_final_loss"]) == pytest.approx(validation["val/log10_final_loss"])
    assert float(meta[0]["time_per_meta_step_s"]) > 0
    assert Path(meta[0]["checkpoint"]).name == "learned_optimizer.pt"
    assert (experiment / "cmp2/meta_train.png").stat().st_size > 1000
    # the markdown table carries the same numbers
    md = _compare(experiment, "--tag", "tiny", "--out_dir", "cmp3", capsys=capsys)
    assert f"{float(rows['adam']['mean_log10_final_loss']):.3f}" in md and "Meta-training runs" in md


def test_compare_filters_by_tag_task_and_job_type(experiment, capsys):
    out = json.loads(_compare(experiment, "--tag", "learned", "--format", "json", "--out_dir", "f1", capsys=capsys))
    assert {r["optimizer"] for r in out["evaluation"]} == {"learned_optimizer", "sgd", "adam"}
    assert all(r["seeds"] == 3 for r in out["evaluation"])  # ev2 carries no "learned" tag
    text = _compare(experiment, "--group", "ev2", "--format", "json", "--out_dir", "f4", capsys=capsys)
    out = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert all(r["seeds"] == 1 and r["ci95"] is None for r in out["evaluation"])  # one seed: no interval
    out = json.loads(_compare(experiment, "--job_type", "meta-train", "--format", "json", "--out_dir", "f2",
                              capsys=capsys))
    assert out["evaluation"] == [] and len(out["meta_train"]) == 1
    assert "no runs matched" in _compare(experiment, "--task", "nope", "--out_dir", "f3", capsys=capsys)


def test_meta_train_run_follows_the_schema(experiment):
    logs = find_run_logs([experiment / "runs"])
    runs = [read_offline_run(f) for f in logs]
    (meta,) = [r for r in runs if r.job_type == "meta-train"]
    assert meta.group == "mt" and meta.tags == ["tiny"] and meta.project == "learnopt"
    assert meta.config["cli"]["model"]["estimator"]["init_args"]["horizon"] == 10  # the full resolved config
    steps, losses = meta.curve(ls.META_LOSS, ls.META_STEP)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    # the exported checkpoint travelled as a W&B artifact of the run
    records = [json.loads(line) for line in _leet_lines(next(Path(meta.path).glob("*.wandb")))]
    artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert any(a["type"] == ls.ARTIFACT_TYPE for a in artifacts)
    # evaluation: one run per optimizer plus the group's summary run with the W&B table and plot
    ev1 = [r for r in runs if r.group == "ev1"]
    assert sorted(r.config.get("kind") for r in ev1) == ["baseline", "baseline", "learned", "summary"]
    (summary,) = [r for r in ev1 if r.config["kind"] == "summary"]
    assert summary.summary[ls.TABLE_KEY]["_type"] == "table-file" and summary.summary[ls.TABLE_KEY]["nrows"] == 3
    table = json.loads((Path(summary.path) / "files" / summary.summary[ls.TABLE_KEY]["path"]).read_text())
    (adam_row,) = [row for row in table["data"] if row[0] == "adam"]
    raw = json.loads((experiment / "ev1/results.json").read_text())["results"]
    assert adam_row[3] == pytest.approx(raw["adam"]["mean_log10_final_loss"])
    (learned,) = [r for r in ev1 if r.config["kind"] == "learned"]
    assert learned.config["evaluate"]["checkpoint"].endswith("learned_optimizer.pt")
    assert learned.config["evaluate"]["task_family"]["class_path"] == "tasks.quadratic.QuadraticFamily"


def _leet_lines(path: Path) -> list[str]:
    import shutil
    import subprocess
    import sys

    exe = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    return subprocess.run([exe, "leet", "inspect", "--json", str(path)], capture_output=True, text=True,
                          check=True, timeout=120).stdout.splitlines()


def test_compare_cli_errors_are_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["compare", "nowhere"])
    assert "nowhere: no such W&B run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--format", "xml"])
    with pytest.raises(SystemExit):
        main(["compare", "x", "--project", "a/b"])
    assert "either offline run paths or --project" in capsys.readouterr().err


# --------------------------------------------------------------------------- sweeps


def _agent_command(sweep_file: Path, values: dict) -> list[str]:
    """The argv `wandb agent` runs for one point of the sweep (wandb's own argument builder and the
    agent's macro substitution), with `${env} ${interpreter} -m learnopt.cli` left out."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    sweep = yaml.safe_load(sweep_file.read_text())
    assert set(values) == set(sweep["parameters"])
    args = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    argv = []
    for chunk in sweep["command"]:
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += args.get(chunk[2:-1], []) if chunk[2:-1] in args else []
        else:
            argv.append(chunk)
    assert argv[:3] == ["-m", "learnopt.cli", sweep["command"][4]]
    return [a.replace("configs/", str(REPO / "configs") + "/") for a in argv[2:]]


def test_baseline_lr_sweep_runs_as_the_agent_would_and_scores_like_grid_tuning(offline):
    from learnopt.evaluate import DEFAULT_LR_GRID, baseline_factory, tune_learning_rate
    from tasks.quadratic import QuadraticFamily

    sweep_file = REPO / "configs/sweeps/tune_baseline_lr.yaml"
    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["parameters"]["lr"]["values"] == pytest.approx(list(DEFAULT_LR_GRID))
    assert sweep["metric"]["name"] == ls.FINAL_LOG10
    tiny = ["--num_instances=4", "--steps=10", "--task_family.init_args.dim=10"]
    scores = {}
    for lr in (0.01, 0.1):
        argv = _agent_command(sweep_file, {"baselines": "[adam]", "lr": lr}) + tiny + [f"--out_dir=sw{lr}"]
        assert main(argv) == 0
        (log,) = [f for f in find_run_logs([offline / "runs"]) if read_offline_run(f).config.get("lr") == lr]
        run = read_offline_run(log)
        assert run.group == "sweep-tune-quadratic" and run.config["optimizer"] == "adam"
        scores[lr] = run.summary[ls.FINAL_LOG10]
    # the sweep's runs score each rate exactly as the built-in tuning does
    _, reference = tune_learning_rate(baseline_factory("adam"), QuadraticFamily(dim=10), steps=10, num_instances=4,
                                      lr_grid=(0.01, 0.1))
    assert scores == pytest.approx(reference)
    # compare shows one row per rate, apart from any held-out evaluation of adam
    comparison, _ = compare([offline / "runs"], out_dir=None)
    rows = {r.optimizer: r.mean for r in comparison.rows}
    assert rows == pytest.approx({"adam @ lr 0.01 [tune split]": scores[0.01],
                                  "adam @ lr 0.1 [tune split]": scores[0.1]})
    assert {read_offline_run(f).job_type for f in find_run_logs([offline / "runs"])} == {"tune"}


def test_meta_train_sweep_runs_as_the_agent_would(offline):
    sweep_file = REPO / "configs/sweeps/meta_train_lstm_quadratic.yaml"
    argv = _agent_command(sweep_file, {"model.meta_lr": 0.003, "model.estimator.init_args.unroll_length": 5,
                                       "model.estimator.init_args.loss_transform": "log",
                                       "model.learned_optimizer.init_args.hidden_size": 4})
    tiny = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--model.estimator.num_tasks=4",
            "--model.estimator.horizon=10", "--model.val_tasks=4", "--trainer.enable_progress_bar=false"]
    assert main(argv + tiny) == 0
    ls.finish_run(wandb.run)
    (log,) = find_run_logs([offline / "runs"])
    run = read_offline_run(log)
    assert run.group == "sweep-lstm-quadratic" and run.job_type == "meta-train"
    model = run.config["cli"]["model"]
    assert model["meta_lr"] == 0.003 and model["estimator"]["init_args"]["unroll_length"] == 5
    exported = list((offline / "runs/sweeps/lstm_quadratic").glob("*.pt"))
    assert [p.stem for p in exported] == [run.id]  # one checkpoint per sweep run, named by its W&B id
    assert learnopt.load(exported[0]).config()["hidden_size"] == 4
    assert "best/val/log10_final_loss" in run.summary


def test_evaluate_under_a_sweep_agent_needs_one_optimizer_per_run(offline, monkeypatch):
    from learnopt.evaluate import evaluate
    from tasks.quadratic import QuadraticFamily

    monkeypatch.setenv("WANDB_SWEEP_ID", "abc")
    with pytest.raises(ValueError, match="one optimizer per run"):
        evaluate(task_family=QuadraticFamily(dim=3), baselines=["sgd", "adam"], lr=0.1)


def test_online_runs_are_read_through_the_public_api_into_the_same_records(tmp_path, monkeypatch):
    """``wandb.Api`` replaced by a stand-in with the public API's attributes (no network here):
    the filters passed and the conversion of each run."""
    seen = {}

    class FakeRun:
        id, name, group, job_type, tags, url = "r1", "ev/adam", "ev", "evaluate", ["tiny"], "https://wandb.ai/x"
        state = "finished"
        config = {"optimizer": "adam", "task": "t", "seeds": [0, 1], "_wandb": {}, ls.SCHEMA_KEY: ls.SCHEMA_VERSION}

        class summary:  # noqa: N801 (the public API's summary object)
            _json_dict = {ls.FINAL_LOG10: -1.0, ls.SEED_LOG10: [-0.5, -1.5]}

        def scan_history(self, keys=None):
            return iter([{ls.INNER_STEP: 0, ls.INNER_LOSS: 0.0}, {ls.INNER_STEP: 1, ls.INNER_LOSS: -1.0}])

    class FakeApi:
        def __init__(self, timeout=None):
            seen["timeout"] = timeout

        def runs(self, path, filters=None):
            seen["path"], seen["filters"] = path, filters
            return [FakeRun()]

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setattr(wandb, "Api", FakeApi)
    (run,) = read_online_runs("me/learnopt", groups=["ev"], tags=["tiny"])
    assert seen["path"] == "me/learnopt"
    assert seen["filters"] == {"group": {"$in": ["ev"]}, "tags": {"$all": ["tiny"]}}
    assert (run.group, run.job_type, run.state) == ("ev", "evaluate", "finished")
    assert run.config == {"optimizer": "adam", "task": "t", "seeds": [0, 1], ls.SCHEMA_KEY: ls.SCHEMA_VERSION}
    assert run.curve(ls.INNER_LOSS, ls.INNER_STEP) == ([0.0, 1.0], [0.0, -1.0])
    comparison, _ = compare(project="me/learnopt", out_dir=None)
    assert comparison.rows[0].seed_values == {"seed 0": -0.5, "seed 1": -1.5}
