"""Reliability of `learnopt compare` and of the black-box API (issue 24): the fault and bad-input
cases, each with the behaviour it must keep. `docs/reliability.md` ("Experiment comparison and
black-box optimisation") lists them with what happened before.

Compare: real offline W&B runs (written by learnopt's logging, by plain `wandb`, in another
project, crashed), and copies of a finished run's transaction log cut inside a record
(truncated) or just before its exit record (running). Black box: small proposers with random
weights (the API does not depend on training) and the committed 3-d proposer on Hartmann3."""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
import torch
import wandb

import learnopt
from learnopt import logging_schema as ls
from learnopt.blackbox import AskTellSession, RNNProposer, as_bounds, minimize
from learnopt.cli import main
from learnopt.compare import log_is_complete, read_offline_run, speedup

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- learnopt compare

ADAM = [-float(t) for t in range(11)]            # reaches -1 at step 1
LEARNED = [-0.1 * t for t in range(11)]          # ends at -1 at step 10: 0.1x tuned adam
FOREIGN_ADAM = [-0.05 * t for t in range(11)]    # a slower "adam" from outside: would give 2x
BEST = [-2.0 * t for t in range(11)]


def _eval_run(save_dir: Path, optimizer: str, curve: list[float], project: str = ls.PROJECT,
              exit_code: int = 0) -> Path:
    run = ls.init_run("evaluate", group="ev", save_dir=save_dir, name=f"ev/{optimizer}", project=project,
                      config={"optimizer": optimizer, "task": "t", "steps": len(curve) - 1, "seeds": [0],
                              "kind": "learned" if optimizer == "learned" else "baseline"})
    ls.log_inner_curve(run, curve)
    ls.log_final(run, {ls.FINAL_LOG10: curve[-1], ls.SEED_LOG10: [curve[-1]]})
    return _finish(run, exit_code)


def _finish(run, exit_code: int = 0) -> Path:
    run_dir = Path(run.dir).parent
    if exit_code == 0:
        ls.finish_run(run)
    else:
        run.finish(exit_code=exit_code)
    log = next(run_dir.glob("*.wandb"))
    for _ in range(500):
        if log_is_complete(log):
            break
        import time

        time.sleep(0.02)
    return run_dir


def _foreign_run(save_dir: Path, curve: list[float]) -> Path:
    """A run in the same project with learnopt's config keys, written by plain wandb (someone's own
    script), not by learnopt's logging."""
    save_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=ls.PROJECT, group="ev", job_type="evaluate", dir=str(save_dir), mode="offline",
                     reinit="finish_previous", settings=wandb.Settings(silent=True),
                     config={"optimizer": "adam", "task": "t", "steps": len(curve) - 1, "seeds": [0],
                             "kind": "baseline"})
    for step, value in enumerate(curve):
        run.log({ls.INNER_LOSS: value, ls.INNER_STEP: step})
    run.summary.update({ls.FINAL_LOG10: curve[-1], ls.SEED_LOG10: [curve[-1]]})
    return _finish(run)


def _record_starts(log: Path) -> list[tuple[int, str]]:
    """Byte offset and W&B record type of every whole record in a `.wandb` file (LevelDB log
    framing: 7-byte file header, 32 KiB blocks, 7-byte record headers), read independently of
    learnopt.compare."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, out = log.read_bytes(), 7, []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0:
            pos += left
            continue
        if kind == 1:  # a whole record
            record = pb.Record()
            record.ParseFromString(data[pos + 7:pos + 7 + length])
            out.append((pos, record.WhichOneof("record_type")))
        pos += 7 + length
    return out


def _copy_cut(run_dir: Path, dest: Path, cut: str) -> Path:
    """A copy of a finished run whose log is cut inside its first history record ("truncated":
    a copy or a disk that ran out) or just before its exit record ("running": the writer has not
    finished)."""
    shutil.copytree(run_dir, dest)
    log = next(dest.glob("*.wandb"))
    starts = _record_starts(log)
    if cut == "truncated":
        at = next(pos for pos, kind in starts if kind == "history") + 12
    else:
        at = next(pos for pos, kind in starts if kind == "exit")
    log.write_bytes(log.read_bytes()[:at])
    return dest


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(root))
        mp.chdir(root)
        d = {
            "adam": _eval_run(root / "base", "adam", ADAM),
            "learned": _eval_run(root / "base", "learned", LEARNED),
            "foreign": _foreign_run(root / "foreign", FOREIGN_ADAM),
            "other": _eval_run(root / "other", "adam", BEST, project="other"),
            "crashed": _eval_run(root / "crashed", "sgd", BEST, exit_code=1),
        }
        d["truncated"] = _copy_cut(d["adam"], root / "cut/offline-run-truncated", "truncated")
        d["running"] = _copy_cut(d["adam"], root / "cut2/offline-run-running", "running")
    d["root"] = root
    return d


def _cli(runs, *args: str, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(["compare", *map(str, args), "--out_dir", str(runs["root"] / "out")])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_learnopt_logging_marks_its_runs_and_plain_wandb_does_not(runs, tmp_path, monkeypatch):
    assert read_offline_run(runs["adam"]).config[ls.SCHEMA_KEY] == ls.SCHEMA_VERSION
    assert ls.SCHEMA_KEY not in read_offline_run(runs["foreign"]).config
    # meta-training logs through the Lightning logger: its runs carry the marker too
    from learnopt.train.wandb_logging import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), group="mt", job_type="meta-train")
    logger.log_hyperparams({"cli": {"model": {"horizon": 3}}})
    run_dir = _finish(logger.experiment)
    config = read_offline_run(run_dir).config
    assert config[ls.SCHEMA_KEY] == ls.SCHEMA_VERSION and config["cli"]["model"]["horizon"] == 3


def test_a_foreign_run_never_replaces_the_reference(runs, capsys):
    code, out, err = _cli(runs, runs["root"] / "base", runs["root"] / "foreign", "--format", "json", capsys=capsys)
    assert code == 0
    table = json.loads(out)
    rows = {r["optimizer"]: r for r in table["evaluation"]}
    # 0.1x from learnopt's own tuned adam, not 2x against the foreign run's curve
    assert rows["learned"]["speedup_vs_reference"] == pytest.approx(speedup(LEARNED, ADAM)) == pytest.approx(0.1)
    assert rows["adam"]["runs"] == ["ev/adam"]
    (skipped,) = table["skipped"]
    assert skipped["reason"].startswith("foreign") and "offline-run" in skipped["path"]
    assert "foreign" in err
    # asked for, a run without the marker is compared (runs of a learnopt older than the marker)
    code, out, _ = _cli(runs, runs["root"] / "foreign", "--include_foreign", "--format", "json", capsys=capsys)
    assert code == 0 and [r["optimizer"] for r in json.loads(out)["evaluation"]] == ["adam"]


def test_runs_of_another_project_are_not_merged_unless_asked(runs, capsys):
    code, out, _ = _cli(runs, runs["root"] / "base", runs["root"] / "other", capsys=capsys)
    assert code == 0 and "other project" in out and "0.10×" in out
    code, out, _ = _cli(runs, runs["root"] / "base", runs["root"] / "other", "--all_projects", "--format", "json",
                        capsys=capsys)
    assert code == 0 and json.loads(out)["skipped"] == []
    # merged: the other project's adam (seed 0 again, read last) replaces this one's
    adam = {r["optimizer"]: r for r in json.loads(out)["evaluation"]}["adam"]
    assert adam["mean_log10_final_loss"] == BEST[-1]
    code, out, _ = _cli(runs, runs["root"] / "base", runs["root"] / "other", "--run_project", "other",
                        "--format", "json", capsys=capsys)
    table = json.loads(out)
    assert [r["optimizer"] for r in table["evaluation"]] == ["adam"] and len(table["skipped"]) == 2


@pytest.mark.parametrize("case, reason", [("truncated", "truncated"), ("running", "running"),
                                          ("crashed", "crashed (exit code 1)")])
def test_unfinished_runs_are_skipped_and_said(runs, case, reason, capsys):
    code, out, err = _cli(runs, runs[case], runs["learned"], capsys=capsys)
    assert code == 0
    assert f"{runs[case]}" in out and reason in out  # which run, and why, in the table's output
    assert "| learned |" in out  # the other run is still compared
    # alone, the run is not "no runs matched" with exit 0: an error that says why
    code, out, err = _cli(runs, runs[case], capsys=capsys)
    assert code == 2 and reason in err and "no runs matched" not in out


def test_a_truncated_reference_is_named_where_its_speedups_are_missing(runs, capsys):
    code, out, _ = _cli(runs, runs["truncated"], runs["learned"], capsys=capsys)
    assert code == 0 and "truncated" in out and "no adam run on task t" in out


def test_unfinished_runs_are_kept_when_asked(runs, capsys):
    code, out, _ = _cli(runs, runs["crashed"], runs["running"], "--include_unfinished", "--format", "json",
                        capsys=capsys)
    assert code == 0 and {r["optimizer"] for r in json.loads(out)["evaluation"]} == {"adam", "sgd"}


def test_filters_that_match_nothing_still_exit_0_and_say_so(runs, capsys):
    code, out, _ = _cli(runs, runs["root"] / "base", "--task", "nope", capsys=capsys)
    assert code == 0 and "no runs matched" in out and "2 runs read" in out


# --------------------------------------------------------------------------- black box


def _proposer(dim=2, trend=False, refine=False, seed=0):
    torch.manual_seed(seed)
    p = RNNProposer(dim=dim, hidden_size=16, num_layers=2, trend=trend, refine=refine).double()
    if refine:  # follow the local model most of the way, so its arithmetic is exercised
        with torch.no_grad():
            p.refine_gate.bias.fill_(2.0)
    return p


def _bowl(x):
    return float(((np.asarray(x) - 0.3) ** 2).sum())


def _finite_only(fun):
    def wrapped(x):
        assert np.all(np.isfinite(x)), f"the objective was called at {x}"
        return fun(x)
    return wrapped


@pytest.mark.parametrize("trend,refine", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("scale", [1e160, 1e300, 1e-300])
def test_huge_observations_are_standardised_without_overflow(trend, refine, scale):
    # the proposer reads standardised observations, so f and scale·f must give the same queries
    p = _proposer(trend=trend, refine=refine)
    ref = minimize(_bowl, [(0, 1), (0, 1)], budget=12, proposer=p)
    res = minimize(_finite_only(lambda x: scale * _bowl(x)), [(0, 1), (0, 1)], budget=12, proposer=p)
    # (the local model's least-squares fit magnifies rounding: f·3 differs from f by 1e-9 there)
    np.testing.assert_allclose(res.xs, ref.xs, rtol=0, atol=1e-7 if refine else 1e-12)
    # one huge outlier among ordinary values: every query stays finite
    calls = []

    def spike(x):
        calls.append(x)
        return 1e200 if len(calls) == 3 else _bowl(x)

    out = minimize(_finite_only(spike), [(0, 1), (0, 1)], budget=12, proposer=p)
    assert np.isfinite(out.xs).all() and out.fun < 1e200


def test_a_box_near_the_largest_float_maps_without_overflow():
    p = _proposer()
    huge = 1e308
    ref = minimize(_bowl, [(-1, 1), (-1, 1)], budget=10, proposer=p)
    res = minimize(_finite_only(lambda x: _bowl(np.asarray(x) / huge)), [(-huge, huge), (-huge, huge)], budget=10,
                   proposer=p)
    assert np.isfinite(res.xs).all() and (np.abs(res.xs) <= huge).all()
    np.testing.assert_allclose(res.xs / huge, ref.xs, rtol=1e-9, atol=1e-12)


def test_the_objective_is_never_called_at_a_non_finite_point():
    p = _proposer()
    with torch.no_grad():
        p.head.bias.fill_(float("nan"))  # a broken proposer: its queries are NaN
    calls = []
    with pytest.raises(RuntimeError, match="non-finite query"):
        minimize(lambda x: calls.append(x) or 0.0, [(0, 1), (0, 1)], budget=5, proposer=p)
    assert calls == []


def test_minimize_keeps_the_history_when_the_objective_raises():
    p = _proposer()
    seen = []

    def flaky(x):
        if len(seen) == 6:
            raise KeyError("simulation crashed")
        seen.append((x, _bowl(x)))
        return seen[-1][1]

    with pytest.raises(KeyError, match="simulation crashed") as info:
        minimize(flaky, [(0, 1), (0, 1)], budget=10, proposer=p)
    res = info.value.result
    assert res.nfev == 6 and not res.success and "evaluation 7" in res.message
    np.testing.assert_array_equal(res.xs, np.stack([x for x, _ in seen]))
    np.testing.assert_array_equal(res.ys, [y for _, y in seen])
    assert any("evaluation 7" in n for n in info.value.__notes__)
    # the session goes on from there (the point that failed is pending in it)
    session = info.value.session
    assert isinstance(session, AskTellSession) and session.num_told == 6
    # a non-finite observation refused by tell keeps the history the same way
    calls = []
    with pytest.raises(ValueError, match="not finite") as info:
        minimize(lambda x: calls.append(x) or (float("nan") if len(calls) == 4 else _bowl(x)), [(0, 1), (0, 1)],
                 budget=10, proposer=p)
    assert info.value.result.nfev == 3


def test_the_seed_draws_a_symmetry_of_the_box_so_restarts_differ():
    p = _proposer()
    runs = {seed: minimize(_bowl, [(0, 1), (0, 1)], budget=8, proposer=p, seed=seed) for seed in (None, 1, 2, 3)}
    with torch.no_grad():  # seed None: the proposer's own frame, as in meta-training
        xs, _ = p.rollout(lambda u: ((u - 0.3) ** 2).sum(-1), 1, 8)
    np.testing.assert_allclose(runs[None].xs, xs[0].numpy(), rtol=1e-9)
    firsts = {tuple(np.round(r.xs[0], 9)) for r in runs.values()}
    assert len(firsts) >= 3  # the deterministic proposer starts at different corners of the box
    np.testing.assert_array_equal(minimize(_bowl, [(0, 1), (0, 1)], budget=8, proposer=p, seed=2).xs, runs[2].xs)
    # a symmetry of the box: queried in a reflected, permuted frame, every query is still in the box
    s = AskTellSession(p, [(-5, 10), (0, 15)], seed=7)
    for _ in range(6):
        x = s.ask()
        assert -5 <= x[0] <= 10 and 0 <= x[1] <= 15
        s.tell(x, float(x.sum()))


def test_restarts_of_the_committed_proposer_on_hartmann3_end_in_different_points():
    from tasks.blackbox_benchmarks import hartmann3

    p = learnopt.load(ROOT / "checkpoints/rnn_proposer_d3.pt")
    f = lambda x: float(hartmann3(torch.as_tensor(x)[None]))  # noqa: E731
    bounds = [tuple(b) for b in hartmann3.bounds.T.tolist()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ends = [minimize(f, bounds, budget=30, proposer=p, seed=seed).x for seed in range(4)]
    assert len({tuple(np.round(x, 3)) for x in ends}) > 1


def test_scipy_bounds_are_accepted_and_ambiguous_shapes_refused():
    p = _proposer()
    pairs = minimize(_bowl, [(-5, 10), (0, 15)], budget=6, proposer=p)
    via_bounds = minimize(_bowl, scipy.optimize.Bounds([-5, 0], [10, 15]), budget=6, proposer=p)
    np.testing.assert_array_equal(via_bounds.xs, pairs.xs)
    np.testing.assert_array_equal(as_bounds(scipy.optimize.Bounds(0, 1), dim=3), [[0, 0, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="finite"):
        as_bounds(scipy.optimize.Bounds([0, 0], [1, np.inf]))
    # a 2x2 array may be [lower, upper] rows or per-dimension pairs: refused, with both spellings
    for ambiguous in (np.array([[-5.0, 0.0], [10.0, 15.0]]), [[-5, 0], [10, 15]],
                      torch.tensor([[0.0, 1.0], [0.0, 1.0]])):
        with pytest.raises(ValueError, match="ambiguous") as info:
            minimize(_bowl, ambiguous, budget=3, proposer=p)
        assert "scipy.optimize.Bounds" in str(info.value) and "(lower, upper) tuples" in str(info.value)
    # unambiguous forms: pairs as tuples, a [2, D] array with D != 2, a [D, 2] array with D != 2
    np.testing.assert_array_equal(as_bounds(((-5, 10), (0, 15))), [[-5, 0], [10, 15]])
    np.testing.assert_array_equal(as_bounds(np.array([[0, 1, 2], [3, 4, 5]])), [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(as_bounds(np.array([[0, 3], [1, 4], [2, 5]])), [[0, 1, 2], [3, 4, 5]])


def test_bad_budget_and_a_learned_optimizer_checkpoint_get_clear_errors():
    p = _proposer()
    for bad in ("5", 5.0, True, None):
        with pytest.raises(TypeError, match="budget must be an integer"):
            minimize(_bowl, [(0, 1), (0, 1)], budget=bad, proposer=p)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        minimize(_bowl, [(0, 1), (0, 1)], budget=0, proposer=p)
    assert minimize(_bowl, [(0, 1), (0, 1)], budget=np.int64(3), proposer=p).nfev == 3
    path = ROOT / "checkpoints/lstm_quadratic.pt"
    with pytest.raises(TypeError, match="lstm_quadratic.pt.*not a black-box proposer.*load_optimizer"):
        minimize(_bowl, [(0, 1), (0, 1)], budget=3, proposer=path)
    with pytest.raises(TypeError, match="not a black-box proposer"):
        minimize(_bowl, [(0, 1), (0, 1)], budget=3, proposer=learnopt.load(path))


def test_noisy_option_reports_the_best_by_a_fitted_model_not_the_luckiest_draw():
    from learnopt.blackbox.session import model_best

    p = _proposer()
    rng = np.random.default_rng(0)
    res = minimize(lambda x: _bowl(x) + 0.05 * rng.standard_normal(), [(0, 1), (0, 1)], budget=20, proposer=p,
                   seed=0, noisy=True)
    assert res.fun_observed == res.ys.min() and np.array_equal(res.x_observed, res.xs[res.ys.argmin()])
    assert any(np.array_equal(res.x, x) for x in res.xs)  # one of the evaluated points
    # the recommendation against the true function: a 7x7 grid, noise 0.1 on a bowl spanning 0.98
    grid = np.linspace(0, 1, 7)
    units = np.array([(a, b) for a in grid for b in grid])
    true = ((units - 0.3) ** 2).sum(1)
    lucky, model = [], []
    for rep in range(6):
        ys = true + 0.1 * np.random.default_rng(rep).standard_normal(len(units))
        i, _ = model_best(units, ys)
        lucky.append(true[ys.argmin()] - true.min())
        model.append(true[i] - true.min())
    assert np.mean(model) < 0.5 * np.mean(lucky)
