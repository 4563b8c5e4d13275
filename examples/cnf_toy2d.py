"""A continuous normalizing flow (FFJORD-style) on a 2-D toy density, trained with SNOpt.

python examples/cnf_toy2d.py --dataset two_moons --epochs 5
"""

import argparse

import snopt


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="two_moons", choices=list(snopt.TOY2D_DATASETS))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--optimizer", default="snopt", choices=["snopt", "adam", "sgd"])
    args = parser.parse_args()
    config = snopt.RunConfig(
        task="toy2d",
        task_kwargs={"dataset": args.dataset},
        optimizer=args.optimizer,
        epochs=args.epochs,
        snopt_update_freq=20,
    )
    result = snopt.run_training(config)
    nll, steps = result.final["metric"], result.stats["steps"]
    print(f"{args.dataset}: validation NLL {nll:.3f} nats after {steps} steps")


if __name__ == "__main__":
    main()
