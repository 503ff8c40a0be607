"""The shared element-wise optimizer pieces, on problems whose answers are known by hand."""

import torch

from saliencylab.methods.optimizers import armijo_search, momentum_step, nesterov_step


def quadratic(h):
    """Rows r: f_r(x) = h_r |x|^2 / 2, gradient h_r x. With Armijo c = 1/2 a step a is accepted iff a h_r <= 1."""
    x = torch.tensor([[1.0, -2.0], [0.5, 1.0], [3.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    h = torch.tensor(h, dtype=torch.float64)
    f = lambda z, rows: 0.5 * h[rows] * z.pow(2).sum(1)  # noqa: E731
    return x, h, f


def test_armijo_search_on_a_quadratic_accepts_the_hand_computed_steps():
    x, h, f = quadratic([1.0, 4.0, 0.1, 1e6])
    g = h[:, None] * x
    every = torch.arange(4)
    calls = []

    def evaluate(rows, a, attempt):
        calls.append((rows.tolist(), attempt.tolist()))
        cand = x[rows] - a[:, None] * g[rows]
        return f(cand, rows), (cand, a.clone())

    loss = f(x, every)
    slope = 0.5 * g.pow(2).sum(1)
    a, tried, (cand, a_seen) = armijo_search(loss, slope, torch.full((4,), 8.0, dtype=torch.float64), evaluate,
                                             decay=0.3, step_min=1e-3)
    # row 0 (h=1): 8, 2.4 fail, 0.72 accepted; row 1 (h=4): 8, 2.4, 0.72 fail, 0.216 accepted;
    # row 2 (h=0.1): 8 accepted at once; row 3 (h=1e6): never sufficient, accepted once the step is
    # below step_min: 8 * 0.3^8 = 5.2e-4 (the 9th candidate)
    expect = torch.tensor([8 * 0.3 ** 2, 8 * 0.3 ** 3, 8.0, 8 * 0.3 ** 8], dtype=torch.float64)
    assert torch.allclose(a, expect, rtol=1e-12)
    assert tried.tolist() == [3, 4, 1, 9]
    # the accepted candidates' extras come back, one row per problem
    assert torch.allclose(a_seen, expect, rtol=1e-12)
    assert torch.allclose(cand, x - expect[:, None] * g)
    # only rows still searching are evaluated, each with its own attempt count
    assert calls[0] == ([0, 1, 2, 3], [0, 0, 0, 0])
    assert calls[1] == ([0, 1, 3], [1, 1, 1])
    assert calls[3] == ([1, 3], [3, 3])
    assert calls[-1] == ([3], [8])


def test_armijo_search_rows_are_independent():
    x, h, f = quadratic([1.0, 4.0, 0.1, 2.0])
    g = h[:, None] * x

    def run(rows):
        rows = torch.tensor(rows)

        def evaluate(sub, a, attempt):
            return f(x[rows][sub] - a[:, None] * g[rows][sub], rows[sub]), ()

        return armijo_search(f(x[rows], rows), 0.5 * g[rows].pow(2).sum(1), torch.full((len(rows),), 8.0,
                             dtype=torch.float64), evaluate, decay=0.3, step_min=1e-3)

    a_all, tried_all, extras = run([0, 1, 2, 3])
    assert extras == ()
    for r in range(4):
        a_one, tried_one, _ = run([r])
        assert a_one.item() == a_all[r].item() and tried_one.item() == tried_all[r].item()


def test_momentum_step_matches_torch_sgd():
    torch.manual_seed(0)
    target = torch.randn(3, 5, dtype=torch.float64)
    w = torch.rand(3, 5, dtype=torch.float64) + 0.5
    p0 = torch.rand(3, 5, dtype=torch.float64)

    def grad(p):
        return 2 * w * (p - target)

    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.SGD([ref], lr=0.05, momentum=0.9, dampening=0.9)
    p, buf = p0.clone(), None
    for _ in range(7):
        opt.zero_grad()
        (w * (ref - target) ** 2).sum().backward()
        opt.step()
        p, buf = momentum_step(p, grad(p), buf, lr=0.05, momentum=0.9, dampening=0.9)
    assert torch.allclose(p, ref.detach(), atol=1e-12)
    assert not torch.allclose(p, p0)


def test_nesterov_step_is_the_authors_formula():
    p = torch.tensor([1.0, 2.0])
    g = torch.tensor([0.5, -1.0])
    new, theta = nesterov_step(p, g, None, lr=0.1, iteration=0)
    assert torch.equal(new, p - 0.1 * g) and torch.equal(theta, new)
    new2, theta2 = nesterov_step(new, g, theta, lr=0.1, iteration=3)
    assert torch.allclose(theta2, new - 0.1 * g)
    assert torch.allclose(new2, theta2 + 0.5 * (theta2 - theta))


def test_element_wise_rmsprop_matches_torch():
    from saliencylab.methods.optimizers import RMSprop

    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 5, generator=g)
    a = torch.zeros(3, 5, requires_grad=True)
    b = torch.zeros(3, 5, requires_grad=True)
    ours, theirs = RMSprop([b], lrs=0.05), torch.optim.RMSprop([a], lr=0.05)
    for _ in range(20):
        for p in (a, b):
            p.grad = None
            ((p - target) ** 2).sum().backward()
        theirs.step()
        ours.step()
    assert torch.allclose(a, b, atol=1e-6)
