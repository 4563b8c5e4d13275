"""An ODE-RNN on irregularly sampled series, with the horizon scale controlled in training.

python examples/timeseries_odernn.py --epochs 6
"""

import argparse

import snopt


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--control", default="feedback", choices=["fixed", "gradient", "feedback"])
    args = parser.parse_args()
    config = snopt.RunConfig(task="timeseries", control=args.control, epochs=args.epochs, t1_every=20)
    result = snopt.run_training(config)
    print(f"validation MSE {result.final['metric']:.4f}, T {result.final['t1/blocks.0']:.3f}")


if __name__ == "__main__":
    main()
