"""Your own Neural ODE: an ODEBlock in a plain nn.Module, SNOpt's preconditioner in front of Adam,
and a declared architecture parameter (a damping coefficient) controlled alongside T.

    python examples/custom_model.py
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import snopt


class DampedField(nn.Module):
    """dx/dt = MLP(t, x) - damping * x, with `damping` a controlled architecture parameter."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = snopt.MLPField(dim, hidden=32)
        self.damping = snopt.ControlParameter(0.5, bounds=(0.0, 5.0))

    def forward(self, t, x):
        return self.net(t, x) - self.damping() * x


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ode = snopt.ODEBlock(DampedField(2), 0.0, 1.0, method="dopri5")
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        return self.head(self.ode(x)).squeeze(-1)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 2)
    y = torch.sin(2 * x[:, 0]) * torch.exp(-0.5 * x[:, 1] ** 2)
    train = DataLoader(TensorDataset(x[:384], y[:384]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x[384:], y[384:]), batch_size=128)

    model = Regressor()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    precond = snopt.SNOptPreconditioner(model, update_freq=20)
    controller = snopt.Controller(model, policy="feedback", lr=0.2, penalty=1e-3, every=10)
    result = snopt.fit(
        model,
        train,
        val,
        optimizer=optimizer,
        preconditioner=precond,
        controller=controller,
        loss_fn=nn.functional.mse_loss,
        metric_fn=nn.functional.mse_loss,
        epochs=5,
    )
    print("validation MSE", result.final["metric"])
    print("controlled values", controller.values)


if __name__ == "__main__":
    main()
