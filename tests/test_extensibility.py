"""Extensibility: user adjoint templates (propgen.adjoint) and propgen.insert_grad_of.

The templates below are deliberately "wrong" (scaled) so that a gradient that matches the
template, not the true derivative, proves the template was used.
"""

from __future__ import annotations

import _lang_helpers as H
import torch

import propgen
from propgen import d

F64 = torch.float64


def rn(*shape):
    return torch.randn(*shape, dtype=F64)


# --------------------------------------------------------------------------------------------
# Templates for user functions
# --------------------------------------------------------------------------------------------


def my_square(x):
    return x * x


@propgen.adjoint(my_square)
def my_square_adjoint(result, x):
    d[x] = d[result] * 3 * x  # true derivative is 2 * x


def my_exp(x):
    return torch.exp(x)


@propgen.adjoint(my_exp)
def my_exp_adjoint(result, x):
    # uses the forward result: true derivative is result, the template doubles it
    d[x] = d[result] * result * 2.0


def my_scaled(x, alpha=2.0):
    return x * alpha


@propgen.adjoint(my_scaled)
def my_scaled_adjoint(result, x, alpha=2.0):
    d[x] = d[result] * alpha * 10.0


def my_mix(a, b):
    return a * b


@propgen.adjoint(my_mix)
def my_mix_adjoint(result, a, b):
    d[a] = d[result] * 5.0
    d[b] = d[result] * 7.0


def test_user_template_replaces_source():
    def f(x):
        return my_square(x).sum()

    x = rn(4)
    torch.testing.assert_close(propgen.grad(f)(x), 3 * x, **H.TIGHT64)


def test_user_template_in_a_chain():
    # the template's d[result] must be the gradient arriving from the rest of the function
    def f(x):
        y = torch.sin(x)
        z = my_square(y) * 4.0
        return z.sum()

    x = rn(5)
    torch.testing.assert_close(
        propgen.grad(f)(x), 4.0 * 3 * torch.sin(x) * torch.cos(x), **H.TIGHT64
    )


def test_user_template_reads_result():
    def f(x):
        return (my_exp(x) * 3.0).sum()

    x = rn(4)
    torch.testing.assert_close(propgen.grad(f)(x), 3.0 * 2.0 * torch.exp(x), **H.TIGHT64)


def test_user_template_keyword_and_default_binding():
    def f(x):
        return my_scaled(x).sum() + my_scaled(x, alpha=3.0).sum() + my_scaled(x, 0.5).sum()

    x = rn(3)
    expected = torch.full_like(x, (2.0 + 3.0 + 0.5) * 10.0)
    torch.testing.assert_close(propgen.grad(f)(x), expected, **H.TIGHT64)


def test_user_template_two_arguments():
    def f(a, b):
        return my_mix(a, b).sum() + my_mix(b, b).sum()

    a, b = rn(3), rn(3)
    ga, gb = propgen.grad(f, wrt=(0, 1))(a, b)
    torch.testing.assert_close(ga, torch.full_like(a, 5.0), **H.TIGHT64)
    torch.testing.assert_close(gb, torch.full_like(b, 7.0 + 5.0 + 7.0), **H.TIGHT64)


def test_user_template_only_for_argument_with_gradient():
    # b is a constant: the template's d[b] line must be dropped, not crash
    def f(a, b):
        return my_mix(a, b).sum()

    a, b = rn(3), rn(3)
    torch.testing.assert_close(propgen.grad(f)(a, b), torch.full_like(a, 5.0), **H.TIGHT64)


def test_user_template_inside_loop():
    def f(x):
        h = x
        for _ in range(3):
            h = my_square(h) * 0.5
        return h.sum()

    x = rn(4)
    # with the template, each step's local derivative is 3 h * 0.5
    h0 = x
    h1 = h0 * h0 * 0.5
    h2 = h1 * h1 * 0.5
    expected = (3 * h2 * 0.5) * (3 * h1 * 0.5) * (3 * h0 * 0.5)
    torch.testing.assert_close(propgen.grad(f)(x), expected, **H.TIGHT64)


# --------------------------------------------------------------------------------------------
# Templates for torch functions that have none
# --------------------------------------------------------------------------------------------


@propgen.adjoint(torch.special.erfcx)
def erfcx_adjoint(result, input):
    d[input] = d[result] * 7.0  # not erfcx's derivative: proves the template is used


def test_template_for_untemplated_torch_function():
    def f(x):
        return torch.special.erfcx(x).sum()

    x = rn(5)
    df = propgen.grad(f)
    torch.testing.assert_close(df(x), torch.full_like(x, 7.0), **H.TIGHT64)
    # the call is not differentiated through torch.autograd any more
    src = propgen.source(df)
    assert "opaque" not in src
    # and the true derivative differs, so the check above can tell them apart
    xr = x.clone().requires_grad_()
    torch.special.erfcx(xr).sum().backward()
    assert not torch.allclose(xr.grad, torch.full_like(x, 7.0))


# --------------------------------------------------------------------------------------------
# insert_grad_of
# --------------------------------------------------------------------------------------------

CLIP = 0.05


def rnn_clipped(x, w):
    h = x
    for _ in range(5):
        with propgen.insert_grad_of(h) as g:
            g = g.clamp(-CLIP, CLIP)
        h = torch.tanh(h * w + 0.3)
    return (h * 3.0).sum()


def rnn_plain(x, w):
    h = x
    for _ in range(5):
        h = torch.tanh(h * w + 0.3)
    return (h * 3.0).sum()


def _clip_hook(g):
    return g.clamp(-CLIP, CLIP)


def _no_hook(g):
    return None


def reference_clipped(x, w, hook=_clip_hook):
    """rnn_clipped through torch.autograd with a gradient hook on each step's input."""
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    h = xr
    for _ in range(5):
        h.register_hook(hook)
        h = torch.tanh(h * wr + 0.3)
    (h * 3.0).sum().backward()
    return xr.grad, wr.grad


def test_insert_grad_of_clips_like_a_hook():
    x, w = rn(6), rn(6) * 2.0
    exp_x, exp_w = reference_clipped(x, w)
    gx, gw = propgen.grad(rnn_clipped, wrt=(0, 1))(x, w)
    torch.testing.assert_close(gx, exp_x, **H.TIGHT64)
    torch.testing.assert_close(gw, exp_w, **H.TIGHT64)
    # clipping must have mattered for this input, or the test proves nothing
    plain_x, plain_w = reference_clipped(x, w, hook=_no_hook)
    assert not torch.allclose(plain_w, exp_w)
    assert not torch.allclose(plain_x, exp_x)
    assert gx.abs().max() <= CLIP + 1e-12


def test_insert_grad_of_does_nothing_in_forward():
    x, w = rn(6), rn(6) * 2.0
    (_, _), result = propgen.grad(rnn_clipped, wrt=(0, 1), preserve_result=True)(x, w)
    torch.testing.assert_close(result, rnn_plain(x, w), **H.TIGHT64)


def test_insert_grad_of_straight_line():
    def f(x):
        y = x * 3.0
        with propgen.insert_grad_of(y) as g:
            g = g * 0.0
        return (y * y).sum() + x.sum()

    x = rn(4)
    # only the direct path x.sum() is left
    torch.testing.assert_close(propgen.grad(f)(x), torch.ones_like(x), **H.TIGHT64)


def rnn_print(x, w):
    h = x
    for _ in range(5):
        with propgen.insert_grad_of(h) as g:
            print("grad-sum", float(g.sum()))
        h = torch.tanh(h * w + 0.3)
    return (h * 3.0).sum()


def test_insert_grad_of_print_runs_in_backward(capsys):
    x, w = rn(6), rn(6) * 2.0
    seen = []

    def record(g):
        seen.append(float(g.sum()))

    reference_clipped(x, w, hook=record)  # hooks fire in backward order: last step first
    df = propgen.grad(rnn_print, wrt=(0, 1))
    capsys.readouterr()
    gx, gw = df(x, w)
    out = capsys.readouterr().out
    printed = [float(line.split()[1]) for line in out.splitlines() if line.startswith("grad-sum")]
    assert len(printed) == 5, out
    # the printed values are gradients, which only exist in the backward pass, in its order
    for p, s in zip(printed, seen, strict=True):
        assert abs(p - s) <= 1e-9 * max(1.0, abs(s)), (printed, seen)
    # a print does not change the gradient
    exp_x, exp_w = reference_clipped(x, w, hook=_no_hook)
    torch.testing.assert_close(gx, exp_x, **H.TIGHT64)
    torch.testing.assert_close(gw, exp_w, **H.TIGHT64)
