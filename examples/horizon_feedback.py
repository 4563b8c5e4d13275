"""Let the second-order feedback policy pick the integration horizon T during training.

Starts from a deliberately poor T0 and prints how T moved, next to the first-order baseline.

    python examples/horizon_feedback.py --t0 0.05 --epochs 4
"""

import argparse

import snopt


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--t0", type=float, default=0.05, help="initial horizon")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--task", default="digits", choices=["digits", "timeseries"])
    args = parser.parse_args()

    for policy in ("feedback", "gradient"):
        config = snopt.RunConfig(
            task=args.task, t1=args.t0, control=policy, epochs=args.epochs, t1_bounds=(0.01, 10.0)
        )
        result = snopt.run_training(config)
        trajectory = [round(r["t1/blocks.0"], 3) for r in result.history[:: max(1, len(result.history) // 8)]]
        print(
            f"{policy:9s} metric={result.final['metric']:.4f} final T={result.final['t1/blocks.0']:.3f} "
            f"T along training: {trajectory}"
        )


if __name__ == "__main__":
    main()
