"""The report logic that lives in ``scripts/`` (importable modules, not heredocs): the tables they
write from evaluation results, checked on results written here and on the committed docs."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(path, entries):
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps({"results": entries}))


def test_andrychowicz_summary_marks_the_lowest_loss_of_each_row(tmp_path):
    report = _script("andrychowicz_report")
    _results(tmp_path / "base", {"lstm": {"mean_final_loss": 0.2, "mean_log10_final_loss": -0.7},
                                 "adam": {"mean_final_loss": 0.1, "mean_log10_final_loss": -1.0}})
    _results(tmp_path / "relu", {"lstm": {"mean_final_loss": 0.05, "mean_log10_final_loss": -1.3},
                                 "adam": {"mean_final_loss": 0.3, "mean_log10_final_loss": -0.52}})
    text = report.summary(tmp_path, ["base|", "relu|--task_family.init_args.activation relu"])
    assert "| test | lstm | adam |" in text
    assert "| base | 0.2000 (-0.70) | **0.1000 (-1.00)** |" in text
    assert "| relu | **0.0500 (-1.30)** | 0.3000 (-0.52) |" in text


def test_andrychowicz_summary_reproduces_the_committed_table():
    report = _script("andrychowicz_report")
    docs = ROOT / "docs" / "andrychowicz_mlp"
    tests = ["base", "steps200", "hidden40", "two_layers", "relu"]
    assert report.summary(docs, tests) == (docs / "README.md").read_text()


def test_ablation_rows_reproduce_the_committed_table():
    ablation = _script("ablation_row")
    docs = ROOT / "docs" / "ablation_quadratic"
    table = (docs / "table.md").read_text()
    for name in ("identity", "log", "log_sign_p10"):
        assert ablation.row(docs / name / "results.json", name) + "\n" in table


def test_vsml_large_sample_chooses_the_open_comparisons():
    sys.path.insert(0, str(ROOT))
    chooser = _script("vsml_large_sample")
    raw = {"seeds": {"a": {"paired_difference_points": [0.5, 1.0]},  # interval contains zero
                     "b": {"paired_difference_points": [-2.0, 1.0]},
                     "c": {"paired_difference_points": [-1.0, 1.0]}}}
    families = {"a (x)": None, "b (y)": None, "breast": None}
    assert chooser.chosen_sets(raw, families, []) == ["a", "c"]
    assert chooser.chosen_sets(raw, families, ["b"]) == ["b (y)", "breast"]
    with pytest.raises(SystemExit, match="no test set starts with"):
        chooser.chosen_sets(raw, families, ["zzz"])


def test_general_long_run_drives_adam_with_the_rules_schedule(tmp_path, monkeypatch):
    import torch

    from learnopt.evaluate import train_with_optimizer
    from learnopt.learned.general_compact import warmup_cosine
    from learnopt.task import seeded_generator

    script = _script("general_long_run")
    out = tmp_path / "long"
    monkeypatch.setattr(sys, "argv", ["general_long_run", "--problem", "logreg_mnist1d", "--steps", "6",
                                      "--instances", "2", "--every", "3", "--peaks", "0.003", "--out", str(out)])
    script.main()
    curves = json.loads(out.with_suffix(".json").read_text())["curves"]
    assert out.with_suffix(".png").exists() and len(curves) == 3
    assert all(len(c) == 7 for c in curves.values())
    assert len({c[0] for c in curves.values()}) == 1  # the same initial weights for every run
    family = script.problem("logreg_mnist1d", ROOT / "configs" / "evaluate_general_suite.yaml")

    def adam(ps):  # written out: Adam at lr 1e-2 times the warm-up + cosine factor of each step
        opt = torch.optim.Adam(ps, lr=1e-2)
        return _Scheduled(opt, lambda t: warmup_cosine(t, 6, 0.05, 0.01))

    g = seeded_generator("test", 0)
    expected = torch.log10(train_with_optimizer(adam, family.sample(2, g), 6, g)).mean(1)
    [adam_curve] = [c for name, c in curves.items() if name.startswith("Adam")]
    assert adam_curve == pytest.approx(expected.tolist(), abs=1e-4)


class _Scheduled:
    def __init__(self, opt, factor):
        self.opt, self.factor, self.t = opt, factor, 0
        self._set()

    def _set(self):
        for group in self.opt.param_groups:
            group["lr"] = 1e-2 * self.factor(self.t)

    def zero_grad(self):
        self.opt.zero_grad()

    def step(self):
        self.opt.step()
        self.t += 1
        self._set()


def test_general_ablations_table_reproduces_the_committed_one():
    report = _script("general_ablations")
    results = json.loads((ROOT / "docs" / "general" / "ablations.json").read_text())
    assert report.table(results) + "\n" == (ROOT / "docs" / "general" / "ablations.md").read_text()
    row = report.table({"x": {"untrained": -1.0, "trained": -2.0, "meta_step": 200,
                              "val_curve": [[100, 200], [-1.5, -2.0]]}}).splitlines()[-1]
    assert row == "| `x` | -1.000 | -2.000 (200) | -1.500 / -2.000 / — | — | — | — | — |"


def test_general_held_out_table_reproduces_the_committed_one():
    report = _script("general_held_out")
    saved = json.loads((ROOT / "docs" / "general" / "held_out.json").read_text())
    assert saved["max_train_log10_difference_from_suite"] == 0.0  # the reruns are the suite's runs
    text = (ROOT / "docs" / "general" / "held_out.md").read_text()
    assert text.endswith(report.table(saved["problems"]) + "\n")
    rows = report.table({"p": {"a": {"lr": 0.01, "train_log10": -1.0, "test_loss": 0.5, "test_accuracy": 0.9},
                               "b": {"lr": None, "train_log10": -2.0, "test_loss": 0.7}},
                         "q": {"c": {"lr": None, "train_log10": 0.4}}}).splitlines()[2:]
    assert rows == ["| `p` | a | 0.01 | -1.000 | 0.5 | 0.900 |", "| `p` | b | — | -2.000 | 0.7 | — |",
                    "| `q` | c | — | 0.400 | — | — |"]  # rows by test loss (training loss without a test split)
