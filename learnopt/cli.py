"""The ``learnopt`` console command."""

from __future__ import annotations

import sys

USAGE = """usage: learnopt <command> [options]

commands:
  meta-train   meta-train a learned optimizer (LightningCLI; --config configs/<file>.yaml, --help)
  evaluate     evaluate a learned optimizer against tuned baselines (--help; --suite: on a
               held-out suite of problems, e.g. --config configs/evaluate_general_suite.yaml)
  compare      compare optimizers across W&B runs: table, plots, HTML (--help)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "meta-train":
        from learnopt.checkpoint import CheckpointError
        from learnopt.train.callbacks import NoExport
        from learnopt.train.cli import meta_train
        from learnopt.train.config_errors import explain
        from learnopt.train.module import NonFiniteMetaTraining
        from learnopt.train.run_lock import RunDirectoryLocked

        try:
            meta_train(rest)
        except (CheckpointError, FileNotFoundError, NoExport, NonFiniteMetaTraining, RunDirectoryLocked,
                ValueError) as err:
            print(f"learnopt meta-train: error: {explain(str(err))}", file=sys.stderr)
            return 1
        return 0
    if command == "evaluate" and "--suite" in rest:
        from learnopt.evaluate_suite import evaluate_suite_cli

        evaluate_suite_cli([a for a in rest if a != "--suite"])
        return 0
    if command == "evaluate":
        from learnopt.evaluate import evaluate_cli

        evaluate_cli(rest)
        return 0
    if command == "compare":
        from learnopt.compare import compare_cli

        compare_cli(rest)
        return 0
    print(f"learnopt: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
