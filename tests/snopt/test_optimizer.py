"""SNOpt: the preconditioned step against dense Kronecker solves, robustness, and a
contract suite shared with torch's Adam and SGD."""

import io
import math

import pytest
import torch
from torch import nn

from snopt._models import ODEClassifier
from snopt._ode import ODEBlock
from snopt._optimizer import (
    SNOpt,
    SNOptPreconditioner,
    eigenbases,
    eigenbasis,
    initial_moment,
    precondition,
)
from snopt._tasks import get_task
from snopt._training import fit

DT = torch.float64
#: The reference form with the old treatment of everything else: constant refresh interval,
#: no trust region, SGD-momentum on untracked parameters.
REF = dict(curvature="reference", untracked="sgd", kl_clip=None, update_growth=0.0)


# ------------------------------------------------------------------ helpers
class Field(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.l1 = nn.Linear(dim, hidden)
        self.l2 = nn.Linear(hidden, dim)

    def forward(self, t, x):
        return self.l2(torch.tanh(self.l1(x)))


def make_model(dtype=torch.float32, seed=0, adjoint=True):
    torch.manual_seed(seed)
    block = ODEBlock(Field(4, 6), 0.0, 0.5, method="rk4", options={"step_size": 0.125}, adjoint=adjoint)
    model = nn.Sequential(nn.Linear(3, 4), block, nn.Linear(4, 2))
    return model.to(dtype) if dtype != torch.float32 else model


def make_batches(steps, dtype=torch.float32, seed=1, n=8):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(n, 3, generator=g).to(dtype)
        out.append((x, (x[:, 0] > x[:, 1]).long()))
    return out


def train(model, opt, batches, scheduler=None):
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def dense_direction(A, B, locations, G, eps):
    """(L A ⊗ B + eps I)^-1 vec(G), with column-major vec, reshaped like G."""
    K = locations * torch.kron(A, B) + eps * torch.eye(A.shape[0] * B.shape[0], dtype=A.dtype)
    vec = torch.linalg.solve(K, G.T.reshape(-1))
    return vec.reshape(G.shape[1], G.shape[0]).T


def _grad_matrix(module):
    g = module.weight.grad.reshape(module.weight.shape[0], -1)
    return torch.cat([g, module.bias.grad[:, None]], 1) if module.bias is not None else g


def _spd(k, g):
    m = torch.randn(k, k + 2, generator=g, dtype=DT)
    return m @ m.T / k


# ------------------------------------------------------------ functional core
def test_precondition_with_alpha_one_is_a_dense_kronecker_solve():
    g = torch.Generator().manual_seed(0)
    A, B = _spd(4, g), _spd(3, g)
    G = torch.randn(3, 4, generator=g, dtype=DT)
    a, ua = eigenbasis(A)
    b, ub = eigenbasis(B)
    m = initial_moment(a, b, 5)
    direction, new_m = precondition(G, ua, ub, m, eps=0.05, alpha=1.0, batch_size=7)
    torch.testing.assert_close(direction, dense_direction(A, B, 5, G, 0.05), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(new_m, m)


def test_precondition_matches_the_explicit_kronecker_eigenbasis_formula():
    """Any alpha: diag(m') with m' = alpha m + (1 - alpha) n (P^T vec G)^2 and P = U_A ⊗ U_B."""
    g = torch.Generator().manual_seed(1)
    A, B = _spd(3, g), _spd(2, g)
    G = torch.randn(2, 3, generator=g, dtype=DT)
    a, ua = eigenbasis(A)
    b, ub = eigenbasis(B)
    m = torch.rand(2, 3, generator=g, dtype=DT)
    direction, new_m = precondition(G, ua, ub, m, eps=0.1, alpha=0.75, batch_size=4)
    P = torch.kron(ua, ub)
    proj = P.T @ G.T.reshape(-1)
    m_vec = 0.75 * m.T.reshape(-1) + 0.25 * 4 * proj**2
    expected = P @ (proj / (m_vec + 0.1))
    torch.testing.assert_close(direction.T.reshape(-1), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(new_m.T.reshape(-1), m_vec, rtol=1e-12, atol=0)


def test_eigenbasis_reconstructs_and_rejects_non_finite_factors():
    g = torch.Generator().manual_seed(2)
    A = _spd(5, g).float()
    values, vectors = eigenbasis(A)
    assert values.dtype == torch.float32 and (values >= 0).all()
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, A, rtol=1e-5, atol=1e-5)
    singular = torch.zeros(3, 3, dtype=DT)
    singular[0, 0] = 1.0
    assert (eigenbasis(singular)[0] >= 0).all()
    A[1, 2] = math.nan
    assert eigenbasis(A) is None
    A[1, 2] = math.inf
    assert eigenbasis(A) is None


def _spy_eigh(monkeypatch, fail=lambda m: False):
    """Record the batch shape of every ``torch.linalg.eigh`` call; raise where ``fail(m)``."""
    calls, real = [], torch.linalg.eigh

    def eigh(m):
        calls.append(tuple(m.shape))
        if fail(m):
            raise torch.linalg.LinAlgError("planted: no convergence")
        return real(m)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    return calls


def _assert_decomposes(dec, factor):
    values, vectors = dec
    assert values.dtype == factor.dtype and (values >= 0).all()
    tol = 1e-5 if factor.dtype == torch.float32 else 1e-10
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, factor, rtol=tol, atol=tol)


def test_eigenbases_decomposes_each_shape_in_one_call_and_matches_one_at_a_time(monkeypatch):
    g = torch.Generator().manual_seed(3)
    factors = [_spd(3, g), _spd(4, g), _spd(3, g), _spd(3, g).float(), _spd(4, g)]
    alone = [eigenbasis(f) for f in factors]
    calls = _spy_eigh(monkeypatch)
    got = eigenbases(factors)
    assert sorted(calls) == [(2, 4, 4), (3, 3, 3)]  # one batched call per shape, dtypes mixed
    for dec, one, factor in zip(got, alone, factors):
        _assert_decomposes(dec, factor)
        torch.testing.assert_close(dec[0], one[0])


def test_eigenbases_gives_none_to_a_non_finite_factor_only():
    g = torch.Generator().manual_seed(4)
    bad = _spd(3, g)
    bad[0, 1] = math.nan
    factors = [_spd(3, g), bad, _spd(3, g)]
    got = eigenbases(factors)
    assert got[1] is None
    _assert_decomposes(got[0], factors[0])
    _assert_decomposes(got[2], factors[2])


def test_eigenbases_falls_back_to_one_at_a_time_when_a_batch_does_not_converge(monkeypatch):
    g = torch.Generator().manual_seed(5)
    factors = [_spd(3, g), _spd(3, g), _spd(3, g)]
    poisoned = factors[1][0, 0].item()
    calls = _spy_eigh(monkeypatch, fail=lambda m: m.dim() == 3 or m[0, 0].item() == poisoned)
    got = eigenbases(factors)
    assert calls == [(3, 3, 3), (3, 3), (3, 3), (3, 3)]
    assert got[1] is None
    _assert_decomposes(got[0], factors[0])
    _assert_decomposes(got[2], factors[2])


def test_a_refresh_decomposes_all_layers_with_one_call_per_factor_shape(monkeypatch):
    model = make_model(DT)
    opt = SNOpt(model, lr=0.1)
    ((x, y),) = make_batches(1, DT)
    nn.functional.cross_entropy(model(x), y).backward()
    shapes = {tuple(m.shape) for layer in opt.collector.layers for m in layer.factors()[:2]}
    calls = _spy_eigh(monkeypatch)
    opt.step()
    assert opt.stats["refreshes"] == 1
    assert len(calls) == len(shapes) < 2 * len(opt.collector.layers)
    assert sorted(c[1:] for c in calls) == sorted(shapes)


# ------------------------------------------------------- refresh-step solves
@pytest.mark.parametrize("adjoint", [True, False])
def test_refresh_step_is_the_dense_solve_for_every_tracked_layer(adjoint):
    model = make_model(DT, adjoint=adjoint)
    opt = SNOpt(model, lr=1.0, momentum=0.0, eps=0.05, alpha=1.0, sample_step=0.25, **REF)
    ((x, y),) = make_batches(1, DT)
    nn.functional.cross_entropy(model(x), y).backward()
    layers = opt.collector.layers
    assert [layer.name for layer in layers] == ["1.field.func.l1", "1.field.func.l2", "0", "2"]
    expected = {}
    for layer in layers:
        A, B, L = layer.factors()
        expected[layer.name] = dense_direction(A, B, L, _grad_matrix(layer.module), 0.05)
    before = {layer.name: _param_matrix(layer.module) for layer in layers}
    opt.step()
    assert opt.stats["refreshes"] == 1 and opt.stats["samples"] == 5  # 4 step starts and an end
    for layer in layers:
        step = before[layer.name] - _param_matrix(layer.module)
        torch.testing.assert_close(step, expected[layer.name], rtol=1e-9, atol=1e-12)


def _param_matrix(module):
    w = module.weight.detach().reshape(module.weight.shape[0], -1)
    return torch.cat([w, module.bias.detach()[:, None]], 1) if module.bias is not None else w.clone()


def test_conv_refresh_step_counts_locations_and_untracked_parameters_get_sgd():
    torch.manual_seed(3)
    model = ODEClassifier.for_images(1, 3, width=2, method="rk4", options={"step_size": 0.5}).to(DT)
    opt = SNOpt(model, lr=0.5, momentum=0.0, eps=0.05, alpha=1.0, sample_step=0.5, **REF)
    x = torch.randn(4, 1, 5, 5, dtype=DT)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    layers = {layer.name: layer for layer in opt.collector.layers}
    field_conv = layers["blocks.0.field.func.conv1.conv"]
    A, B, L = field_conv.factors()
    assert L == 25 and A.shape == (3 * 9 + 1, 3 * 9 + 1) and B.shape == (2, 2)
    expected = dense_direction(A, B, L, _grad_matrix(field_conv.module), 0.05)
    before = _param_matrix(field_conv.module)
    norm = model.stem[1]
    norm_before, norm_grad = norm.weight.detach().clone(), norm.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(
        (before - _param_matrix(field_conv.module)) / 0.5, expected, rtol=1e-9, atol=1e-12
    )
    torch.testing.assert_close(norm.weight.detach(), norm_before - 0.5 * norm_grad)


def test_basis_is_kept_between_refreshes_and_moment_follows_the_running_update():
    model = make_model(DT)
    opt = SNOpt(model, lr=0.1, momentum=0.0, eps=0.05, alpha=0.5, update_freq=3, sample_step=0.25, **REF)
    weight = model[2].weight
    bases = []
    for i, (x, y) in enumerate(make_batches(4, DT)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert opt.collector.armed == (i in (0, 3))
        if i == 1:
            state = opt.state[weight]
            ua, ub, m = state["basis_a"].clone(), state["basis_b"].clone(), state["moment"].clone()
            G = _grad_matrix(model[2])
            before = _param_matrix(model[2])
        opt.step()
        if i == 1:
            direction, m_new = precondition(G, ua, ub, m, eps=0.05, alpha=0.5, batch_size=8)
            torch.testing.assert_close(before - _param_matrix(model[2]), 0.1 * direction)
            torch.testing.assert_close(opt.state[weight]["moment"], m_new)
        bases.append(opt.state[weight]["basis_a"].clone())
    assert torch.equal(bases[0], bases[1]) and torch.equal(bases[1], bases[2])
    assert not torch.equal(bases[2], bases[3])
    assert opt.stats["refreshes"] == 2


@pytest.mark.parametrize(
    "curvature,sampling", [("kfac", "steps"), ("reference", "steps"), ("kfac", "stages")]
)
@pytest.mark.parametrize("full_precond", [True, False])
def test_optimizer_equals_preconditioner_in_front_of_torch_sgd(full_precond, curvature, sampling):
    kw = dict(
        eps=0.1, alpha=0.75, update_freq=2, update_growth=0.0, sample_step=0.25, full_precond=full_precond
    )
    kw.update(curvature=curvature, sampling=sampling)
    m1, m2 = make_model(DT), make_model(DT)
    opt1 = SNOpt(m1, lr=0.2, momentum=0.9, weight_decay=1e-3, untracked="sgd", kl_clip=None, **kw)
    precond = SNOptPreconditioner(m2, **kw)
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    for x, y in make_batches(5, DT):
        for model, opt in ((m1, opt1), (m2, None)):
            (opt or opt2).zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if opt is None:
                precond.step()
                opt2.step()
            else:
                opt.step()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-14)
    assert opt1.stats["refreshes"] == precond.stats["refreshes"] == 3
    tracked = {layer.name for layer in precond.collector.layers}
    assert ("0" in tracked) == full_precond


def test_preconditioner_state_dict_resumes_exactly():
    m1, m2 = make_model(DT), make_model(DT)
    kw = dict(update_freq=3, sample_step=0.25)
    p1 = SNOptPreconditioner(m1, **kw)
    o1 = torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9)
    batches = make_batches(7, DT)

    def run(model, precond, opt, part):
        for x, y in part:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            precond.step()
            opt.step()

    run(m1, p1, o1, batches[:4])
    saved = _round_trip({"model": m1.state_dict(), "opt": o1.state_dict(), "pre": p1.state_dict()})
    p2 = SNOptPreconditioner(m2, **kw)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    m2.load_state_dict(saved["model"])
    o2.load_state_dict(saved["opt"])
    p2.load_state_dict(saved["pre"])
    assert p2.stats == p1.stats
    run(m1, p1, o1, batches[4:])
    run(m2, p2, o2, batches[4:])
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"Unknown layers \['nope'\].*tracked layers are"):
        p2.load_state_dict({**saved["pre"], "layers": {"nope": {}}})


# ----------------------------------------------------------------- robustness
def test_non_finite_gradients_skip_the_step_with_a_warning():
    model = make_model()
    opt = SNOpt(model, lr=0.1, update_freq=5, sample_step=0.25)
    (x, y), (x2, y2) = make_batches(2)
    nn.functional.cross_entropy(model(x), y).backward()
    model[2].bias.grad[0] = math.nan
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match=r"non-finite gradients at step 1; the step is skipped") as rec:
        opt.step()
    assert rec[0].filename == __file__
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert opt.stats["skipped_steps"] == 1 and opt.stats["refreshes"] == 0 and not opt.state
    # The skipped refresh is retried at the next step.
    assert opt.collector.armed
    opt.zero_grad()
    nn.functional.cross_entropy(model(x2), y2).backward()
    opt.step()
    assert opt.stats["refreshes"] == 1 and opt.steps == 2


def test_non_finite_factors_skip_that_refresh_and_keep_the_previous_basis():
    model = make_model(DT)
    opt = SNOpt(model, lr=0.1, update_freq=2, sample_step=0.25, **REF)
    batches = make_batches(3, DT)
    layer = opt.collector.layers[0]
    bases = []
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if i in (0, 2):
            next(iter(layer.pending.values())).a[0][0, 0] = math.nan
            with pytest.warns(
                RuntimeWarning, match=r"factors of layer\(s\) \['1.field.func.l1'\] are not finite"
            ):
                opt.step()
        else:
            opt.step()
        bases.append(opt.state[layer.weight]["basis_a"].clone())
    # Identity before the first refresh; the healthy layers were refreshed.
    assert torch.equal(bases[0], torch.eye(5, dtype=DT)) and torch.equal(bases[2], bases[0])
    assert torch.isfinite(model[1].func.l1.weight).all()
    assert not torch.equal(opt.state[model[2].weight]["basis_a"], torch.eye(5, dtype=DT))
    assert opt.stats["skipped_refreshes"] == 2 and opt.stats["refreshes"] == 2


def test_preconditioner_sets_non_finite_gradients_to_none():
    model = make_model()
    precond = SNOptPreconditioner(model, sample_step=0.25)
    ((x, y),) = make_batches(1)
    nn.functional.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = math.inf
    with pytest.warns(RuntimeWarning, match=r"SNOptPreconditioner: non-finite gradients at step 1") as rec:
        precond.step()
    assert rec[0].filename == __file__
    assert all(p.grad is None for p in model.parameters())
    assert precond.stats["skipped_steps"] == 1


def test_schedules_are_called_with_the_step_and_validated():
    model = make_model()
    seen = []

    def lr(step):
        seen.append(step)
        return 0.0 if step == 1 else 0.1

    opt = SNOpt(
        model, lr=lr, momentum=0.0, eps=lambda s: 0.05, update_freq=lambda s: 2, sample_step=lambda s: 0.5
    )
    batches = make_batches(3)
    train(model, opt, batches[:1])
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, batches[1:2])  # lr(1) = 0: nothing moves
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert seen == [0, 0, 1]  # validation at construction, then one call per step
    opt.param_groups[0]["eps"] = lambda s: -1.0
    with pytest.raises(
        ValueError, match=r"`eps` schedule must return a positive number, but eps\(2\) returned -1.0"
    ):
        train(model, opt, batches[2:])


def test_stats_reach_the_fit_result():
    model = make_model()
    opt = SNOpt(model, lr=0.1, update_freq=2, update_growth=0.0, sample_step=0.25)
    x = torch.randn(32, 3)
    y = (x[:, 0] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    result = fit(model, loader, optimizer=opt, loss_fn=nn.functional.cross_entropy, epochs=1, progress=False)
    stats = result.stats["optimizer"]
    assert set(stats) == {
        "refreshes",
        "skipped_steps",
        "skipped_refreshes",
        "collect_time",
        "decompose_time",
        "samples",
    }
    # Two refreshes, each with 4 step starts and t0.
    assert stats["refreshes"] == 2 and stats["samples"] == 10 and stats["collect_time"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_parameters_keep_device_and_dtype():
    model = make_model().cuda()
    opt = SNOpt(model, lr=0.1, update_freq=1, sample_step=0.25)
    train(model, opt, [(x.cuda(), y.cuda()) for x, y in make_batches(2)])
    for state in opt.state.values():
        for value in state.values():
            assert value.device.type == "cuda" and value.dtype == torch.float32


# ------------------------------------------------------------- contract suite
OPTIMIZERS = ["snopt", "snopt-reference", "adam", "sgd"]


def make_optimizer(kind, model, params=None, **kw):
    if kind == "snopt-reference":
        kind = "snopt"
        kw = {"curvature": "reference", "momentum": 0.9, "lr": 0.01, **kw}
    if kind == "snopt":
        kw.setdefault("lr", 0.1)
        kw.setdefault("update_freq", 3)
        kw.setdefault("sample_step", 0.25)
        return SNOpt(model, params=params, **kw)
    params = model.parameters() if params is None else params
    if kind == "adam":
        return torch.optim.Adam(params, **{"lr": 0.01, **kw})
    return torch.optim.SGD(params, **{"lr": 0.1, "momentum": 0.9, **kw})


def _round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_contract_state_dict_round_trip_continues_identically(kind):
    batches = make_batches(8)
    m1 = make_model()
    o1 = make_optimizer(kind, m1)
    train(m1, o1, batches[:4])
    saved = _round_trip({"model": m1.state_dict(), "opt": o1.state_dict()})
    m2 = make_model(seed=99)
    o2 = make_optimizer(kind, m2)
    m2.load_state_dict(saved["model"])
    o2.load_state_dict(saved["opt"])
    if kind.startswith("snopt"):
        keys = set(saved["opt"]["state"][4])  # the head's weight
        own = (
            {"moment", "momentum_buffer"} if kind == "snopt-reference" else {"factor_a", "factor_b", "scale"}
        )
        assert {"basis_a", "basis_b", "eigenvalues_a", "eigenvalues_b", *own} <= keys
        assert saved["opt"]["snopt"]["steps"] == 4 and o2.stats == o1.stats
    l1 = train(m1, o1, batches[4:])
    l2 = train(m2, o2, batches[4:])
    assert l1 == l2
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_contract_dtype_is_kept(kind, dtype):
    model = make_model(dtype)
    opt = make_optimizer(kind, model)
    train(model, opt, make_batches(2, dtype))
    assert all(p.dtype == dtype for p in model.parameters())
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                assert value.dtype == dtype, key


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_contract_param_groups_use_their_own_learning_rate(kind):
    batch = make_batches(1)

    def first_step(groups_lr):
        model = make_model()
        if groups_lr is None:
            return model, None
        params = [
            {"params": list(model[0].parameters()) + list(model[1].parameters()), "lr": groups_lr[0]},
            {"params": model[2].parameters(), "lr": groups_lr[1]},
        ]
        # SNOpt's trust region is per param group, so groups would change the clip: off here.
        kw = {"kl_clip": None} if kind.startswith("snopt") else {}
        opt = make_optimizer(kind, model, params=params, **kw)
        assert [g["lr"] for g in opt.param_groups] == list(groups_lr)
        train(model, opt, batch)
        return model, opt

    def single(lr):
        model = make_model()
        kw = {"kl_clip": None} if kind.startswith("snopt") else {}
        train(model, make_optimizer(kind, model, lr=lr, **kw), batch)
        return model

    grouped, _ = first_step((0.1, 0.01))
    fast, slow = single(0.1), single(0.01)
    for name, p in grouped.named_parameters():
        ref = dict((fast if not name.startswith("2.") else slow).named_parameters())[name]
        torch.testing.assert_close(p, ref, rtol=0, atol=0)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_contract_lr_scheduler_drives_the_learning_rate(kind):
    batches = make_batches(2)
    model = make_model()
    opt = make_optimizer(kind, model, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, batches[:1], scheduler)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    state = _round_trip(opt.state_dict())
    snapshot = _round_trip(model.state_dict())
    train(model, opt, batches[1:])
    other = make_model()
    other.load_state_dict(snapshot)
    fresh = make_optimizer(kind, other, lr=0.05)
    fresh.load_state_dict(state)
    train(other, fresh, batches[1:])
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


INVALID = [
    ("snopt", dict(lr=-1.0), ValueError, r"`lr` must be a positive number, but got lr=-1.0"),
    ("snopt", dict(lr=math.nan), ValueError, r"`lr` must be a positive number, but got lr=nan"),
    (
        "snopt",
        dict(momentum=1.0),
        ValueError,
        r"`momentum` must be a number in \[0, 1\), but got momentum=1.0",
    ),
    ("snopt", dict(weight_decay=-0.1), ValueError, r"`weight_decay` must be a non-negative number"),
    ("snopt", dict(eps=0.0), ValueError, r"`eps` must be a positive number, but got eps=0.0"),
    ("snopt", dict(alpha=1.5), ValueError, r"`alpha` must be a number in \[0, 1\], but got alpha=1.5"),
    (
        "snopt",
        dict(update_freq=0),
        ValueError,
        r"`update_freq` must be a positive integer, but got update_freq=0",
    ),
    ("snopt", dict(update_freq=2.5), ValueError, r"`update_freq` must be a positive integer"),
    ("snopt", dict(update_freq=True), ValueError, r"`update_freq` must be a positive integer"),
    ("snopt", dict(sample_step=0.0), ValueError, r"`sample_step` must be a number in \(0, 1\]"),
    ("snopt", dict(sample_step=2.0), ValueError, r"`sample_step` must be a number in \(0, 1\]"),
    ("snopt", dict(full_precond="yes"), ValueError, r"`full_precond` must be True or False, but got"),
    (
        "snopt",
        dict(sampling="stage"),
        ValueError,
        r"`sampling` must be one of \['steps', 'stages'\], but got sampling='stage'",
    ),
    (
        "snopt",
        dict(lr=lambda s: -1.0),
        ValueError,
        r"`lr` schedule must return a positive number, but lr\(0\)",
    ),
    (
        "snopt",
        dict(update_freq=lambda s: 0),
        ValueError,
        r"`update_freq` schedule must return a positive integer",
    ),
    ("snopt", dict(lr="0.1"), ValueError, r"`lr` must be a positive number, but got lr='0.1'"),
    ("adam", dict(lr=-1.0), ValueError, r"Invalid learning rate: -1.0"),
    ("adam", dict(betas=(1.0, 0.9)), ValueError, r"Invalid beta parameter at index 0"),
    ("adam", dict(eps=-1.0), ValueError, r"Invalid epsilon value"),
    ("sgd", dict(lr=-1.0), ValueError, r"Invalid learning rate: -1.0"),
    ("sgd", dict(momentum=-0.5), ValueError, r"Invalid momentum value"),
    ("sgd", dict(weight_decay=-1.0), ValueError, r"Invalid weight_decay value"),
]


@pytest.mark.parametrize("kind,kwargs,exc,match", INVALID)
def test_contract_invalid_hyperparameters_raise(kind, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_optimizer(kind, make_model(), **kwargs)


def test_preconditioner_rejects_an_unknown_sampling():
    with pytest.raises(
        ValueError, match=r"`sampling` must be one of \['steps', 'stages'\], but got sampling='grid'"
    ):
        SNOptPreconditioner(make_model(), sampling="grid")


def test_snopt_rejects_a_bad_param_group_and_a_non_module():
    model = make_model()
    with pytest.raises(ValueError, match=r"`eps` must be a positive number, but got eps=-2"):
        SNOpt(model, lr=0.1, params=[{"params": model.parameters(), "eps": -2}])
    opt = SNOpt(model, lr=0.1)
    with pytest.raises(ValueError, match=r"`alpha` must be a number in \[0, 1\], but got alpha=2"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "alpha": 2})
    with pytest.raises(TypeError, match=r"`model` must be an nn.Module, but got list"):
        SNOpt([torch.zeros(1, requires_grad=True)], lr=0.1)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_contract_seeded_runs_are_reproducible(kind):
    def run(seed):
        model = make_model(seed=seed)
        losses = train(model, make_optimizer(kind, model), make_batches(5, seed=seed))
        return losses, [p.detach().clone() for p in model.parameters()]

    (l1, p1), (l2, p2), (l3, _) = run(3), run(3), run(4)
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert l1 != l3


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_contract_converges_on_a_quadratic(kind):
    """Linear least squares: the loss reaches the closed-form optimum."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 3, generator=g, dtype=DT)
    y = (
        x @ torch.tensor([[1.5], [-2.0], [0.5]], dtype=DT)
        + 0.3
        + 0.1 * torch.randn(64, 1, generator=g, dtype=DT)
    )
    design = torch.cat([x, torch.ones(64, 1, dtype=DT)], 1)
    solution = torch.linalg.lstsq(design, y).solution
    optimum = ((design @ solution - y) ** 2).mean().item()
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    lr = {"snopt": 0.1, "snopt-reference": 0.1, "adam": 0.05, "sgd": 0.05}[kind]
    # SNOpt's B is the second moment of the residual-scaled gradients (an empirical Fisher),
    # so its steps shrink like 1/residual far from the optimum and grow near it: a larger
    # damping eps keeps the final approach stable.
    opt = make_optimizer(kind, model, lr=lr, **({"update_freq": 10, "eps": 0.5} if "snopt" in kind else {}))
    for _ in range(400):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    final = ((model(x) - y) ** 2).mean().item()
    assert final == pytest.approx(optimum, rel=1e-4)


# ---------------------------------------------------------- real models train
def _fixed_batch_training(task, model, batch, opt, steps):
    with torch.no_grad():
        before = task.loss(model, batch).item()
    for _ in range(steps):
        opt.zero_grad()
        task.loss(model, batch).backward()
        opt.step()
    with torch.no_grad():
        after = task.loss(model, batch).item()
    return before, after


MODELS = [
    ("digits", dict(width=4, n_blocks=2), 0.05),  # conv fields, two blocks
    ("toy2d", dict(hidden=8), 0.05),  # CNF: tuple state, inner trace gradient
    ("timeseries", dict(hidden_dim=6), 0.3),  # ODE-RNN: many solves per forward, GRU cell (on Adam)
]


@pytest.mark.parametrize("name,model_kwargs,lr", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("adjoint", [True, False])
def test_real_models_train_with_snopt(name, model_kwargs, lr, adjoint):
    torch.manual_seed(0)
    task = get_task(name)
    # Two RK4 steps per unit of time and 16 samples: enough for the loss to fall, half the cost.
    model = task.build_model(method="rk4", options={"step_size": 0.5}, adjoint=adjoint, **model_kwargs)
    train_loader, _ = task.loaders(16, seed=0)
    batch = next(iter(train_loader))
    opt = SNOpt(model, lr=lr, update_freq=3, sample_step=0.25)
    before, after = _fixed_batch_training(task, model, batch, opt, steps=8)
    assert after < 0.9 * before
    assert opt.stats["refreshes"] == 3 and opt.stats["samples"] > 0
    assert opt.stats["skipped_steps"] == opt.stats["skipped_refreshes"] == 0


def test_multi_block_vector_classifier_trains_with_snopt():
    torch.manual_seed(1)
    model = ODEClassifier.for_vectors(
        4, 3, width=4, n_blocks=3, depth=1, method="rk4", options={"step_size": 0.5}
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 4, generator=g)
    y = x[:, :3].argmax(1)
    opt = SNOpt(model, lr=0.1, update_freq=4, sample_step=0.5)
    assert len([layer for layer in opt.collector.layers if layer.block is not None]) == 6
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
