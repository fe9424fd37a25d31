"""The VSML meta-test re-measured on more episodes (``scripts/vsml_large_sample`` runs it; the
protocol and the environment variables are described there)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def chosen_sets(raw: dict, families: dict, prefixes: list[str]) -> list[str]:
    """The test sets to re-measure: those whose name starts with one of ``prefixes``, or, with
    none given, every set whose 256-episode paired interval against the stronger tuned baseline
    (``raw["seeds"][set]["paired_difference_points"]``: mean, half-width) contains zero."""
    if prefixes:
        chosen = [t for t in families if any(t.startswith(a) for a in prefixes)]
        if not chosen:
            raise SystemExit(f"vsml_large_sample: no test set starts with {prefixes}; sets: {list(families)}")
        return chosen
    return [t for t, v in raw["seeds"].items()
            if abs(v["paired_difference_points"][0]) <= v["paired_difference_points"][1]]


def main(argv: list[str]) -> None:
    from tqdm import tqdm

    import learnopt
    from learnopt.metrics import t_interval
    from learnopt.vsml import OnlineLinear
    from learnopt.vsml.evaluate import online_correct
    from tasks.online import seeded_batches, vsml_meta_test_families

    out, N = Path(os.environ.get("REPRO_OUT", "docs/vsml")), int(os.environ.get("EPISODES", 4096))
    if N % 8 or N < 256:
        raise SystemExit(f"vsml_large_sample: EPISODES must be a multiple of 8 and at least 256, got {N}")
    raw = json.loads((out / "results.json").read_text())
    meta_path = os.environ.get("VSML_META", "checkpoints/vsml_meta.pt")
    meta = learnopt.load(meta_path)
    families = vsml_meta_test_families(meta.checkpoint_metadata["task_family"]["init_args"]["episode_length"])
    chosen = chosen_sets(raw, families, argv)
    lr = {o: raw["tuning"][o]["chosen"] for o in ("sgd", "adam")}
    learners = {"VSML": meta, f"SGD (lr {lr['sgd']:.3g})": OnlineLinear("sgd", lr=lr["sgd"]),
                f"Adam (lr {lr['adam']:.3g})": OnlineLinear("adam", lr=lr["adam"])}
    names = list(learners)
    md = ["# VSML meta-test on more episodes", "",
          f"Produced by `scripts/vsml_large_sample` for `{meta_path}`. The protocol of `scripts/reproduce_vsml --eval` "
          "scores 256 episodes per set. Where the VSML's paired 95% interval against the stronger tuned baseline "
          f"contains zero there, the same comparison is re-measured here on the first {N} episodes of the same test "
          "seeds (the 256 included). Same learners, same learning rates, the VSML at its seed 0. Mean online accuracy "
          "over the 100 examples (%), and per-episode differences (points, mean ± 95% t-interval).", "",
          "| test set | episodes | " + " | ".join(names) + " | VSML − Adam | VSML − SGD |",
          "|---" * (len(names) + 4) + "|"]
    result = {"episodes": N, "checkpoint": meta_path, "sets": {}}
    if not chosen:
        md.append("| (none: every never-seen set's 256-episode interval excludes zero) |" + " |" * (len(names) + 3))
    for test in chosen:
        streams = seeded_batches(families[test], "test", n=N // 8)
        per = {n: online_correct(learner, tqdm(streams, desc=f"{test.split(' (')[0]}: {n}")).mean(1)
               for n, learner in learners.items()}
        d_adam = t_interval(100 * (per[names[0]] - per[names[2]]))
        d_sgd = t_interval(100 * (per[names[0]] - per[names[1]]))
        result["sets"][test] = {"means": {n: float(v.mean()) for n, v in per.items()},
                                "vsml_minus_adam": d_adam, "vsml_minus_sgd": d_sgd}
        md.append(f"| {test} | {N} | " + " | ".join(f"{100 * float(v.mean()):.2f}" for v in per.values())
                  + f" | {d_adam[0]:+.2f} ± {d_adam[1]:.2f} | {d_sgd[0]:+.2f} ± {d_sgd[1]:.2f} |")
    (out / "large_sample.json").write_text(json.dumps(result, indent=1))
    (out / "large_sample.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
