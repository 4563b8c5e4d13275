"""In-training feedback against TPE, Gaussian-process and random search, under one NFE budget.

The studies stay in ./snopt.db (Optuna) and the runs in ./mlflow.db (MLflow);
the report lands in ./compare_report/.

    python examples/compare_search.py --nfe 20000
"""

import argparse

from snopt.search import Budget, compare


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nfe", type=int, default=20_000, help="function-evaluation budget per strategy")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    report = compare(
        "digits",
        strategies=["feedback", "tpe", "gp", "random"],
        budget=Budget(nfe=args.nfe),
        seeds=args.seeds,
        output_dir="compare_report",
    )
    print(report.to_markdown())


if __name__ == "__main__":
    main()
