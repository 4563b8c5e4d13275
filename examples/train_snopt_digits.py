"""Train the conv ODE classifier on `digits` with SNOpt and with Adam, side by side.

python examples/train_snopt_digits.py --epochs 3
"""

import argparse

import torch

import snopt


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    task = snopt.get_task("digits")
    rows = []
    for name in ("snopt", "adam"):
        torch.manual_seed(args.seed)
        model = task.build_model(t1=1.0, method="dopri5")
        train, val = task.loaders(batch_size=64, seed=args.seed)
        if name == "snopt":
            optimizer = snopt.SNOpt(model, lr=0.01, update_freq=50)
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        result = snopt.fit(
            model, train, val, task=task, optimizer=optimizer, epochs=args.epochs, seed=args.seed
        )
        rows.append(
            {
                "optimizer": name,
                "accuracy": result.final["metric"],
                "train_s": result.stats["wall_time"],
                "nfe": result.stats["nfe_total"],
            }
        )
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
