"""Language coverage: every construct of the issue's list, checked against torch.autograd.

Each differentiated function is an ordinary Python function; the reference is the same function
run on tensors that require grad.  Comparisons are in float64 with tight tolerances unless a
test is about another dtype.
"""

from __future__ import annotations

import math
import random
import warnings
import zlib

import _lang_helpers as H
import pytest
import torch
import torch.nn.functional as F
from _lang_helpers import (
    assert_matches_autograd,
    helper_calls_helper,
    reference_grads,
    rnn_step,
    scale_add,
    split_pair,
)

import propgen

F64 = torch.float64


def rn(*shape, dtype=F64, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def pos(*shape, dtype=F64):
    return torch.rand(*shape, dtype=dtype) + 0.5


OFFSET = torch.linspace(-1.0, 1.0, 4, dtype=F64)  # a module-level tensor of this module
FACTOR = 1.5  # a module-level Python constant


# --------------------------------------------------------------------------------------------
# Differentiated functions
# --------------------------------------------------------------------------------------------


def arith_broadcast(x, y, z):
    # x: (3, 4), y: (4,), z: (3, 1)
    a = x + y
    b = x * z - y / (z * z + 1.0)
    c = 2.0 - a + 3.0 * b / 4.0
    e = (x - 1.5) ** 2 + 2.0 ** (y * 0.1) - (-x)
    return (a * c + e).sum()


def comparisons(x, y):
    # comparisons are non-differentiable masks; the selected values are differentiable
    mask = (x > y).to(x.dtype)
    m2 = (x <= 0.3) & (y >= -0.2)
    w = torch.where(x < y, x * y, x - y)
    eq = (x == x).to(x.dtype)
    return (mask * x + m2.to(x.dtype) * y + w * eq).sum()


def matmul_forms(a, b, v):
    # a: (3, 4), b: (4, 5), v: (4,)
    m = a @ b
    mv = a @ v
    vm = v @ b
    vv = v @ v
    return (m * m).sum() + mv.sum() + (vm * 2.0).sum() + vv


def unary_math(x, p):
    # p is positive
    s = torch.exp(x) + torch.log(p) + torch.sin(x) + torch.cos(x) + torch.tanh(x)
    s = s + torch.sigmoid(x) + torch.relu(x) + torch.sqrt(p) + torch.abs(x) + (-x)
    s = s + torch.reciprocal(p) + p.rsqrt() + x.exp().log1p() + torch.expm1(x * 0.1)
    s = s + x.sin().cos() + torch.square(x) + p.pow(1.5)
    return s.sum()


def reductions(x):
    # x: (3, 4, 5)
    a = x.sum(dim=1)
    b = torch.sum(x, dim=2, keepdim=True)
    c = x.mean(0)
    d2 = torch.mean(x, dim=(0, 2), keepdim=True)
    e = x.amax(dim=-1)
    f = torch.logsumexp(x, dim=1)
    g = x.prod(dim=2)
    n = x.norm(dim=0)
    return (
        (a * a).sum()
        + (b * x).sum()
        + c.sum()
        + (d2 * x).sum()
        + e.sum()
        + f.sum()
        + (g.sum() + n.sum())
    )


def methods_and_functions(x, w):
    y = x.mul(w).add(1.0)
    z = torch.mul(x, w).sub(y.tanh())
    t = x.t().matmul(z)
    return y.sum(dim=1).pow(2).sum() + torch.sum(z) + t.trace()


def with_defaults(x, scale=2.0, shift=None):
    y = x * scale
    if shift is not None:
        y = y + shift
    return torch.sum(y.exp(), dim=0, keepdim=False).sum()


def keyword_calls(x, y):
    a = scale_add(x, y, alpha=3.0)
    b = scale_add(y=x, x=y)
    c = torch.clamp(a, min=-1.0, max=1.5)
    return (a * b).sum() + c.sum() + torch.norm(b, p=2)


def attribute_reads(x):
    n, m = x.shape
    z = torch.ones(n, dtype=x.dtype, device=x.device)
    k = x.size(1)
    s = x.T @ z
    scale = 1.0 / (m * k)
    if x.dtype == torch.float64 and x.ndim == 2:
        scale = scale * 2.0
    return (s * s).sum() * scale + x.numel() * x.mean()


def for_range_forms(x):
    acc = x[0] * 0.0
    for i in range(3):
        acc = acc + x[i] * (i + 1)
    for i in range(1, 5):
        acc = acc * 0.9 + x[i].sin()
    for i in range(5, 0, -2):
        acc = acc - x[i] * x[i - 1]
    for i in range(len(x) - 1, -1, -3):
        acc = acc + x[i].exp() * 0.1
    return acc.sum()


def for_rows(x, w):
    acc = torch.zeros(x.shape[1], dtype=x.dtype)
    for row in x:
        acc = torch.tanh(acc * w + row)
    return acc.sum()


def for_zip_enumerate(x, y):
    acc = 0.0
    for a, b in zip(x, y):
        acc = acc + (a * b).sum()
    for i, row in enumerate(x):
        acc = acc + row.sum() * i
    for i, (a, b) in enumerate(zip(x, y)):
        acc = acc + (a - b).pow(2).sum() * (i + 1)
    return acc


def for_list_of_tensors(x, y):
    acc = x.sum() * 0.0
    for t in [x, y, x * y, torch.sin(y)]:
        acc = acc + (t * t).sum()
    return acc


def while_data_dependent(x):
    while x.norm() > 1:
        x = x / 2
    return (x * x).sum()


def while_counter(x):
    i = 0
    y = x
    while i < 4:
        y = y * 0.5 + torch.sin(y)
        i += 1
    return y.sum()


def if_tensor_cond(x):
    if x.sum() > 1.0:
        y = x.exp()
    elif x.mean() < -0.5:
        y = x * x * 3.0
    else:
        y = torch.sin(x)
    return y.sum()


def if_python_cond(x, mode, k):
    if mode == "square":
        y = x * x
    elif mode == "cube" and k > 0:
        y = x**3 * k
    else:
        y = x.sin()
    if k > 2:
        y = y * k
    return y.sum()


def nested_loops_branches(x, w):
    acc = torch.zeros((), dtype=x.dtype)
    for i in range(3):
        for j in range(i, 4):
            if (i + j) % 2 == 0:
                acc = acc + (x[j] * w[i]).sin()
            elif x[j] > 0:
                acc = acc + x[j] * w[i]
            else:
                acc = acc - w[i] ** 2
        if acc > 0:
            acc = acc * 0.5
    return acc


def early_return_in_if(x):
    if x.sum() > 0:
        return (x * x).sum()
    y = x.exp()
    return y.sum()


def early_return_in_loop(x):
    acc = x.sum() * 0.0
    for i in range(10):
        acc = acc + (x * (i + 1)).sin().sum()
        if acc > 1.0:
            return acc * 2.0
    return acc


def break_continue_for(x):
    acc = x[0] * 0.0
    for i in range(len(x)):
        if i == 1:
            continue
        if x[i].sum() > 0.2:
            break
        acc = acc + x[i] * x[i]
    return acc.sum()


def break_continue_while(x):
    i = 0
    acc = x.sum() * 0.0
    while True:
        i += 1
        if i % 2 == 0:
            continue
        acc = acc + (x * i).tanh().sum()
        if i > 6:
            break
    return acc


def conditional_expressions(x, flag):
    a = x.sin() if x.sum() > 0 else x.cos()
    b = x * 2.0 if flag else x * 3.0
    c = a if a.mean() > b.mean() else b
    return (a * b + c).sum()


def tuple_unpacking(x, y):
    a, b = x, y
    a, b = b * 2.0, a + b
    v, i = torch.max(x, 1)
    vals, idx = x.sort(dim=1)
    q, r = split_pair(y)
    return (a * b).sum() + (v**2).sum() + (vals[:, 0] * 3.0).sum() + (q * r).sum()


def aug_assign_names(x):
    y = x.sin()
    y += x**2
    y *= x
    y -= 1.0
    y /= 2.0
    acc = 0.0
    acc += y.sum()
    acc *= 3.0
    return acc


def aug_assign_subscript(x):
    buf = torch.zeros(3, x.shape[1], dtype=x.dtype)
    for i in range(x.shape[0]):
        buf[i % 3] += x[i] * (i + 1)
    buf[0] *= 2.0
    return (buf**2).sum()


def buffer_store(x, w):
    # x: (T, n)
    T, n = x.shape
    out = torch.zeros(T, n, dtype=x.dtype, device=x.device)
    h = torch.zeros(n, dtype=x.dtype, device=x.device)
    for t in range(T):
        h = torch.tanh(h * w + x[t])
        out[t] = h
    out[0] = out[0] * 3.0
    steps = torch.arange(T, dtype=x.dtype, device=x.device).unsqueeze(1)
    return (out * steps).sum() + (out**2).sum()


def list_ops(x):
    hs = []
    h = x[0]
    for t in range(1, x.shape[0]):
        h = torch.sin(h + x[t])
        hs.append(h)
    first = hs[0]
    last = hs[-1]
    stacked = torch.stack(hs)
    pair = [first * 2.0, last]
    return (stacked**2).sum() + (first * last).sum() + pair[0].sum() + pair[1].mean()


def dict_ops(x, y):
    cache = {"a": x * 2.0, "b": y.exp()}
    cache["c"] = cache["a"] * cache["b"]
    cache["a"] = cache["a"] + 1.0
    return cache["a"].sum() + cache["c"].sum() + (cache["b"] ** 2).sum()


def comprehensions(x):
    sq = [x[i] * x[i] for i in range(x.shape[0])]
    ev = [x[i].sin() * i for i in range(x.shape[0]) if i % 2 == 0]
    rows = [row.exp() for row in x]
    return torch.stack(sq).sum() + torch.stack(ev).sum() + torch.stack(rows).mean()


def lambdas(x, y):
    sq = lambda t: t * t  # noqa: E731
    mix = lambda a, b=2.0: a * b + torch.sin(a)  # noqa: E731
    return sq(x).sum() + mix(y).sum() + mix(x, y).sum()


def nested_defs(x, w):
    s = w.sum()

    def inner(t):
        return torch.sin(t) * s

    def outer(t):
        return inner(t) + inner(t * 2.0) * w

    return outer(x).sum()


def calls_helpers(x, y):
    a = scale_add(x, y)
    b = helper_calls_helper(x)
    c = H.affine_global(y)
    d1 = H.with_branch(x, True) + H.with_branch(y, False)
    return (a * b).sum() + c.sum() + d1.sum()


def helper_in_loop(xs, w):
    h = torch.zeros(xs.shape[1], dtype=xs.dtype)
    for t in range(xs.shape[0]):
        h = rnn_step(h, xs[t], w)
    return h.sum()


def helper_tuple(x):
    s, c = split_pair(x)
    pair = H.split_pair(s)
    return (s * c).sum() + pair[0].sum() + (pair[1] ** 2).sum()


def module_globals(x):
    y = x * FACTOR + OFFSET
    z = H.scale_add(y, H.B_GLOBAL, alpha=H.SCALE)
    for off in H.OFFSETS:
        z = z + off * torch.tanh(z)
    return (z @ H.W_GLOBAL).sum()


def rnn50(x, W, U, h0):
    h = h0
    for t in range(50):
        h = torch.tanh(x[t] @ W + h @ U)
    return (h**2).sum()


def mlp(x, w1, w2):
    h = torch.relu(x @ w1 + 0.1)
    y = torch.tanh(h @ w2)
    return (y * y).mean() + math.pi * y.sum()


def three_args(x, y, z):
    return (x * y).sum() + (y * z.exp()).sum() + z.sum()


def unused_wrt(x, w):
    return (x * x).sum()


def subscripts(x, idx):
    # x: (4, 5); idx: a LongTensor of row indices (a constant)
    a = x[1]
    b = x[:, 2]
    c = x[1:3, ::2]
    e = x[-1, 1:-1]
    f = x[idx]
    g = x[x > 0.5]
    h = x[None, ..., 0]
    return (a[:-1] * b).sum() + c.exp().sum() + (e**2).sum() + f.sum() * 2.0 + g.sum() + h.sum()


def shape_ops(x):
    # x: (2, 3, 4)
    a = x.reshape(6, 4)
    b = x.view(2, 12).t()
    c = x.permute(2, 0, 1).contiguous()
    e = x.unsqueeze(0).expand(3, 2, 3, 4)
    f = torch.cat([x, x * 2.0], dim=1)
    g = x.flatten(1).squeeze()
    h = x.transpose(0, 2)
    return (
        (a @ a.T).sum()
        + (b * b).sum()
        + c[0].sum()
        + e.mean()
        + f.pow(2).sum()
        + g.sin().sum()
        + h[1].sum()
    )


def nn_functional(x, w):
    h = F.relu(x @ w)
    p = F.softmax(h, dim=-1)
    lp = torch.log_softmax(h, dim=1)
    z = F.gelu(x) + torch.sigmoid(x) * F.silu(x)
    return (p * lp).sum() + F.mse_loss(h, torch.ones_like(h)) + z.mean()


def lambda_closing_over_local(x, y):
    k = y.sum()
    by_k = lambda t: t * k + y  # noqa: E731
    return (by_k(x) * by_k(x * 2.0)).sum()


def helper_early_return_in_loop(x):
    acc = torch.zeros_like(x)
    for i in range(4):
        acc = acc + H.with_branch(x * (i + 1) * 0.1, i % 2 == 0)
    return acc.sum()


def return_in_nested_loop(x):
    acc = x.sum() * 0.0
    for i in range(4):
        for j in range(4):
            acc = acc + (x[i] * x[j]).tanh()
            if acc > 1.5:
                return acc
    return acc * 2.0


def while_with_break(x):
    y = x
    n = 0
    while y.abs().max() < 100.0:
        y = y * 1.2 + 0.1
        n += 1
        if n >= 20:
            break
    return y.sum()


def list_in_tensor_loop(x):
    kept = []
    for row in x:
        if row.sum() > 0:
            kept.append(row * 2.0)
        else:
            kept.append(row.exp())
    return torch.stack(kept).prod(dim=1).sum()


def list_subscript_aug(x):
    hs = [x[0] * 1.0, x[1] * 2.0, x[2].sin()]
    for i in range(3):
        hs[i] += x[i] * x[(i + 1) % 3]
    hs[1] *= 3.0
    return torch.stack(hs).sum()


def dict_in_loop(x):
    stats = {"s": x[0] * 0.0, "q": x[0] * 0.0}
    for i in range(x.shape[0]):
        stats["s"] = stats["s"] + x[i]
        stats["q"] = stats["q"] + x[i] * x[i]
    return (stats["q"] - stats["s"] * stats["s"] / x.shape[0]).sum()


def closure_appends(x):
    out = []

    def push(t):
        out.append(t.tanh())

    for row in x:
        push(row * 2.0)
    push(x.sum(0))
    return torch.stack(out).pow(2).sum()


def max_then_gather(x):
    v, i = torch.max(x, 1)
    picked = x[torch.arange(x.shape[0]), i]
    return (v * picked).sum() + x.gather(1, i.unsqueeze(1)).sum()


def clone_store_overwrite(x):
    out = x.clone()
    out[0] = 0.0
    out[:, 1] = x[:, 0] * 5.0
    return (out * out).sum()


def tensor_index_store(x, v):
    buf = torch.zeros(6, dtype=x.dtype)
    idx = torch.tensor([4, 1, 3])
    buf[idx] = v * x[:3]
    buf[0] = x[3]
    return (buf * torch.arange(1.0, 7.0, dtype=x.dtype)).sum()


def loop_var_after_loop(x):
    for i in range(3):  # noqa: B007
        x = x * 1.5
    for row in x:  # noqa: B007
        pass
    return (x * i).sum() + row.sum()


def empty_loop(x):
    y = x * 2.0
    for i in range(0):
        y = y * i
    n = 0
    while n < 0:
        y = y.exp()
    return y.sum()


def builtin_sum_min_max(x):
    parts = [x[i] * (i + 1) for i in range(3)]
    total = sum(parts)
    k = max(1, min(3, x.shape[0]))
    return (total * k).sum() + abs(x).sum()


def stop_gradient(x):
    c = float(x.sum())
    d1 = x.detach() * 3.0
    k = x.max().item()
    return (x * c + d1 * x + x * k).sum()


def multiple_targets(x):
    a = b = x * 2.0
    a = a + 1.0
    return (a * b).sum()


def chained_comparisons(x):
    acc = x.sum() * 0.0
    for i in range(5):
        if 0 < i < 3:
            acc = acc + x[i]
        elif i >= 3 and not i == 4:
            acc = acc * x[i]
    return acc


def branch_rebinds_its_test(x):
    acc = x * 1.0
    for i in range(5):
        big = i > 1
        if big:
            big = i > 3  # the backward must re-test with the value the branch was taken on
            acc = acc * x
        if big:
            acc = acc + x.sin()
    return acc.sum()


def aliased_gradients(x, w):
    # w's gradient arrives through an unbroadcast that returns its argument, then through
    # fresh products: the in-place accumulation must never write into a shared tensor.
    y = x + w
    z = y * y + y.T @ y + y
    return (z * x).sum() + (y + y).sum()


def names_like_propgens(x, _stack, saved, d_x):
    _redo = x * 2.0
    for _ in range(2):
        _redo = _redo * _stack + saved * d_x
    return _redo.sum()


def distribution_objects(mu, log_sigma, x):
    # Normal(...) and its methods are opaque; the object between them hides its tensors
    dist = torch.distributions.Normal(mu, log_sigma.exp())
    other = torch.distributions.Normal(mu * 0.5, 1.0)
    kl = torch.distributions.kl_divergence(dist, other)
    return dist.log_prob(x).sum() + dist.entropy().sum() + (dist.mean * x).sum() + kl.sum()


def dict_views(x):
    d = {k: v * (k + 1) for k, v in enumerate(x)}
    return sum(d.values()) + max(d.values()) * min(d.values())


def while_early_return(x):
    n = 0
    while n < 10:
        x = torch.sin(x) * 1.3
        if x.sum() > 1.0:
            return x.sum() * 2.0
        n += 1
    return x.sum()


def reuse_subexpression(x):
    y = x * x
    z = y + y * y
    return (z + y).sum()


# --------------------------------------------------------------------------------------------
# Table-driven checks against torch.autograd
# --------------------------------------------------------------------------------------------

CASES = [
    ("arith_broadcast", arith_broadcast, lambda: (rn(3, 4), rn(4), rn(3, 1)), (0, 1, 2), {}),
    ("comparisons", comparisons, lambda: (rn(3, 4), rn(3, 4)), (0, 1), {}),
    ("matmul", matmul_forms, lambda: (rn(3, 4), rn(4, 5), rn(4)), (0, 1, 2), {}),
    ("unary_math", unary_math, lambda: (rn(3, 4), pos(3, 4)), (0, 1), {}),
    ("reductions", reductions, lambda: (rn(3, 4, 5),), (0,), {}),
    ("methods_and_functions", methods_and_functions, lambda: (rn(4, 4), rn(4)), (0, 1), {}),
    ("default_args", with_defaults, lambda: (rn(3, 4),), (0,), {}),
    ("default_overridden_pos", with_defaults, lambda: (rn(3, 4), 0.5), (0,), {}),
    ("default_overridden_kw", with_defaults, lambda: (rn(3, 4),), (0,), {"scale": -1.0}),
    ("kwarg_tensor", with_defaults, lambda: (rn(3, 4), 1.5, rn(4)), (0, 2), {}),
    ("keyword_calls", keyword_calls, lambda: (rn(3, 4), rn(3, 4)), (0, 1), {}),
    ("attribute_reads", attribute_reads, lambda: (rn(3, 4),), (0,), {}),
    ("for_range", for_range_forms, lambda: (rn(7, 3),), (0,), {}),
    ("for_rows", for_rows, lambda: (rn(5, 3), rn(3)), (0, 1), {}),
    ("for_zip_enumerate", for_zip_enumerate, lambda: (rn(4, 3), rn(4, 3)), (0, 1), {}),
    ("for_list_of_tensors", for_list_of_tensors, lambda: (rn(3), rn(3)), (0, 1), {}),
    ("while_data_dependent", while_data_dependent, lambda: (rn(5) * 4.0,), (0,), {}),
    ("while_data_dependent_0_iter", while_data_dependent, lambda: (rn(5) * 0.01,), (0,), {}),
    ("while_counter", while_counter, lambda: (rn(4),), (0,), {}),
    ("if_tensor_then", if_tensor_cond, lambda: (rn(5) + 2.0,), (0,), {}),
    ("if_tensor_elif", if_tensor_cond, lambda: (rn(5) * 0.1 - 2.0,), (0,), {}),
    ("if_tensor_else", if_tensor_cond, lambda: (rn(5) * 0.01,), (0,), {}),
    ("if_python_square", if_python_cond, lambda: (rn(4), "square", 1), (0,), {}),
    ("if_python_cube", if_python_cond, lambda: (rn(4), "cube", 3), (0,), {}),
    ("if_python_else", if_python_cond, lambda: (rn(4), "other", 0), (0,), {}),
    ("nested_loops_branches", nested_loops_branches, lambda: (rn(4), rn(3)), (0, 1), {}),
    ("early_return_if_taken", early_return_in_if, lambda: (rn(4) + 2.0,), (0,), {}),
    ("early_return_if_not_taken", early_return_in_if, lambda: (rn(4) - 2.0,), (0,), {}),
    ("early_return_loop", early_return_in_loop, lambda: (rn(4) * 0.3,), (0,), {}),
    ("early_return_loop_none", early_return_in_loop, lambda: (rn(4) * 0.0 + 1e-3,), (0,), {}),
    ("break_continue_for", break_continue_for, lambda: (rn(6, 3) * 0.8,), (0,), {}),
    ("break_continue_while", break_continue_while, lambda: (rn(3),), (0,), {}),
    ("ifexp_true", conditional_expressions, lambda: (rn(4) + 1.0, True), (0,), {}),
    ("ifexp_false", conditional_expressions, lambda: (rn(4) - 1.0, False), (0,), {}),
    ("tuple_unpacking", tuple_unpacking, lambda: (rn(3, 4), rn(3, 4)), (0, 1), {}),
    ("augassign_names", aug_assign_names, lambda: (rn(3, 4),), (0,), {}),
    ("augassign_subscript", aug_assign_subscript, lambda: (rn(5, 3),), (0,), {}),
    ("buffer_store", buffer_store, lambda: (rn(6, 3), rn(3)), (0, 1), {}),
    ("list_ops", list_ops, lambda: (rn(5, 3),), (0,), {}),
    ("dict_ops", dict_ops, lambda: (rn(3), rn(3)), (0, 1), {}),
    ("comprehensions", comprehensions, lambda: (rn(5, 3),), (0,), {}),
    ("lambdas", lambdas, lambda: (rn(3), rn(3)), (0, 1), {}),
    ("nested_defs", nested_defs, lambda: (rn(3), rn(3)), (0, 1), {}),
    ("calls_helpers", calls_helpers, lambda: (rn(4), rn(4)), (0, 1), {}),
    ("helper_in_loop", helper_in_loop, lambda: (rn(6, 3), rn(3, 3) * 0.5), (0, 1), {}),
    ("helper_tuple", helper_tuple, lambda: (rn(3, 2),), (0,), {}),
    ("module_globals", module_globals, lambda: (rn(4),), (0,), {}),
    ("mlp", mlp, lambda: (rn(8, 5), rn(5, 6), rn(6, 2)), (0, 1, 2), {}),
    ("subscripts", subscripts, lambda: (rn(4, 5), torch.tensor([2, 0, 2])), (0,), {}),
    ("shape_ops", shape_ops, lambda: (rn(2, 3, 4),), (0,), {}),
    ("nn_functional", nn_functional, lambda: (rn(5, 4), rn(4, 3)), (0, 1), {}),
    ("lambda_closing_over_local", lambda_closing_over_local, lambda: (rn(3), rn(3)), (0, 1), {}),
    ("helper_early_return_in_loop", helper_early_return_in_loop, lambda: (rn(3),), (0,), {}),
    ("return_in_nested_loop", return_in_nested_loop, lambda: (rn(4) * 0.3 + 1.0,), (0,), {}),
    ("return_in_nested_loop_none", return_in_nested_loop, lambda: (rn(4) * 0.01,), (0,), {}),
    ("while_with_break", while_with_break, lambda: (rn(3) * 0.01,), (0,), {}),
    ("list_in_tensor_loop", list_in_tensor_loop, lambda: (rn(5, 3),), (0,), {}),
    ("list_subscript_aug", list_subscript_aug, lambda: (rn(3, 2),), (0,), {}),
    ("dict_in_loop", dict_in_loop, lambda: (rn(5, 2),), (0,), {}),
    ("closure_appends", closure_appends, lambda: (rn(4, 3),), (0,), {}),
    ("max_then_gather", max_then_gather, lambda: (rn(4, 5),), (0,), {}),
    ("clone_store_overwrite", clone_store_overwrite, lambda: (rn(3, 4),), (0,), {}),
    ("tensor_index_store", tensor_index_store, lambda: (rn(4), rn(3)), (0, 1), {}),
    ("loop_var_after_loop", loop_var_after_loop, lambda: (rn(3, 2),), (0,), {}),
    ("empty_loop", empty_loop, lambda: (rn(3),), (0,), {}),
    ("builtin_sum_min_max", builtin_sum_min_max, lambda: (rn(4, 2),), (0,), {}),
    ("stop_gradient", stop_gradient, lambda: (rn(4),), (0,), {}),
    ("multiple_targets", multiple_targets, lambda: (rn(3),), (0,), {}),
    ("chained_comparisons", chained_comparisons, lambda: (rn(5),), (0,), {}),
    ("names_like_propgens", names_like_propgens, lambda: (rn(3), rn(3), rn(3), rn(3)),
     (0, 1, 2, 3), {}),
    ("distribution_objects", distribution_objects, lambda: (rn(3), rn(3), rn(3)), (0, 1, 2),
     {}),
    ("dict_views", dict_views, lambda: (rn(4),), (0,), {}),
    ("branch_rebinds_its_test", branch_rebinds_its_test, lambda: (rn(3),), (0,), {}),
    ("aliased_gradients", aliased_gradients, lambda: (rn(3, 3), rn(3, 3)), (0, 1), {}),
    ("while_early_return", while_early_return, lambda: (rn(3).abs() * 0.5 + 0.2,), (0,), {}),
    ("while_early_return_none", while_early_return, lambda: (rn(3) * 0.01 - 1.0,), (0,), {}),
    ("reuse_subexpression", reuse_subexpression, lambda: (rn(3),), (0,), {}),
]


@pytest.mark.parametrize(
    "fn, make_args, wrt, kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_matches_autograd(fn, make_args, wrt, kwargs):
    assert_matches_autograd(fn, *make_args(), wrt=wrt, kwargs=kwargs)


def test_branches_really_differ():
    # The three if_tensor inputs above must take three different branches, otherwise the
    # table would not cover elif/else.  Sanity check on the plain function, drawing the
    # inputs exactly as the table does (each table test starts from seed 0).
    taken = []
    for make in (lambda: rn(5) + 2.0, lambda: rn(5) * 0.1 - 2.0, lambda: rn(5) * 0.01):
        torch.manual_seed(0)
        x = make()
        if x.sum() > 1.0:
            taken.append("if")
        elif x.mean() < -0.5:
            taken.append("elif")
        else:
            taken.append("else")
    assert taken == ["if", "elif", "else"]


def test_while_loop_runs_several_times():
    x = rn(5) * 4.0
    k, y = 0, x
    while y.norm() > 1:
        y = y / 2
        k += 1
    assert k >= 3
    # f = sum((x / 2**k)**2) so the gradient is 2 x / 4**k
    got = propgen.grad(while_data_dependent)(x)
    torch.testing.assert_close(got, 2 * x / 4**k, **H.TIGHT64)


def test_rnn_50_steps():
    x, W, U, h0 = rn(50, 4), rn(4, 6) * 0.5, rn(6, 6) * 0.3, rn(6)
    df = assert_matches_autograd(rnn50, x, W, U, h0, wrt=(0, 1, 2, 3))
    # a second call with other inputs reuses the compiled function and is still right
    x2 = rn(50, 4)
    exp, _ = reference_grads(rnn50, (x2, W, U, h0), (0, 1, 2, 3))
    got = df(x2, W, U, h0)
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, **H.TIGHT64)


def test_closure_over_tensor():
    c = rn(4)
    k = 0.25

    def f(x):
        return (torch.sin(x * c) + k * x * x).sum()

    assert_matches_autograd(f, rn(4))


def test_closure_sees_current_value_of_cell():
    # propgen resolves closure variables through the function's cells: rebinding the cell
    # after defining f must be seen, as Python would see it.
    c = rn(3)

    def f(x):
        return (x * c).sum()

    c = rn(3) + 10.0
    df = propgen.grad(f)
    torch.testing.assert_close(df(rn(3)), c, **H.TIGHT64)


def test_top_level_lambda():
    f = lambda x: (x * x * x).sum()  # noqa: E731
    x = rn(4)
    torch.testing.assert_close(propgen.grad(f)(x), 3 * x * x, **H.TIGHT64)


def test_preserve_result():
    x, w1, w2 = rn(8, 5), rn(5, 6), rn(6, 2)
    df = propgen.grad(mlp, wrt=(0, 2), preserve_result=True)
    out = df(x, w1, w2)
    assert isinstance(out, tuple) and len(out) == 2
    grads, result = out
    exp, res = reference_grads(mlp, (x, w1, w2), (0, 2))
    assert isinstance(grads, tuple) and len(grads) == 2
    torch.testing.assert_close(result, res, **H.TIGHT64)
    for g, e in zip(grads, exp, strict=True):
        torch.testing.assert_close(g, e, **H.TIGHT64)


def test_preserve_result_single_wrt():
    x = rn(3, 4)
    grads, result = propgen.grad(unary_math, wrt=(0,), preserve_result=True)(x, pos(3, 4))
    assert isinstance(grads, torch.Tensor)
    assert grads.shape == x.shape


def test_several_wrt_in_wrt_order():
    x, y, z = rn(3), rn(3), rn(3)
    exp, _ = reference_grads(three_args, (x, y, z), (0, 1, 2))
    gz, gx = propgen.grad(three_args, wrt=(2, 0))(x, y, z)
    torch.testing.assert_close(gz, exp[2], **H.TIGHT64)
    torch.testing.assert_close(gx, exp[0], **H.TIGHT64)
    gy = propgen.grad(three_args, wrt=(1,))(x, y, z)
    torch.testing.assert_close(gy, exp[1], **H.TIGHT64)


def test_default_wrt_is_first_argument():
    x, y, z = rn(3), rn(3), rn(3)
    exp, _ = reference_grads(three_args, (x, y, z), (0,))
    torch.testing.assert_close(propgen.grad(three_args)(x, y, z), exp[0], **H.TIGHT64)


def test_wrt_argument_without_gradient_is_zeros():
    x, w = rn(3), rn(2, 5)
    gx, gw = propgen.grad(unused_wrt, wrt=(0, 1))(x, w)
    torch.testing.assert_close(gx, 2 * x, **H.TIGHT64)
    torch.testing.assert_close(gw, torch.zeros_like(w), rtol=0, atol=0)


def test_defaults_of_user_function_are_used():
    x = rn(3, 4)
    df = propgen.grad(with_defaults)
    torch.testing.assert_close(df(x), 2.0 * torch.exp(2.0 * x), **H.TIGHT64)
    torch.testing.assert_close(df(x, scale=-1.0), -torch.exp(-x), **H.TIGHT64)
    torch.testing.assert_close(df(x, 3.0), 3.0 * torch.exp(3.0 * x), **H.TIGHT64)


# --------------------------------------------------------------------------------------------
# dtype and device generality
# --------------------------------------------------------------------------------------------

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]


def device_generic(x, w):
    z = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    h = z
    for t in range(x.shape[0]):
        h = torch.tanh(x[t] * w + h)
    ones = torch.ones_like(h)
    return (h @ ones) + (x.T @ x).trace() * 0.1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "fn, shapes",
    [
        (device_generic, ((5, 3), (3,))),
        (mlp, ((8, 5), (5, 6), (6, 2))),
        (arith_broadcast, ((3, 4), (4,), (3, 1))),
        (buffer_store, ((6, 3), (3,))),
    ],
    ids=["device_generic", "mlp", "arith_broadcast", "buffer_store"],
)
def test_dtype_device(fn, shapes, dtype, device):
    args = tuple(rn(*s, dtype=dtype, device=device) for s in shapes)
    df = assert_matches_autograd(fn, *args, wrt=tuple(range(len(args))), dtype=dtype)
    got = as_list(df(*args))
    for g, a in zip(got, args, strict=True):
        assert g.dtype == dtype and g.device == a.device


def as_list(g):
    return list(g) if isinstance(g, tuple) else [g]


# --------------------------------------------------------------------------------------------
# Broadcasting, property-based
# --------------------------------------------------------------------------------------------


def broadcast_ops(x, y):
    return ((x * y + x / (y * y + 1.0) - y) ** 2).sum() + (x - y).exp().mean()


def broadcastable_shapes(count: int, seed: int = 0) -> list:
    """Pairs of shapes that broadcast together: a full shape of 1 to 3 dims, each side keeping
    or collapsing each dim to 1, the second side also dropping leading dims."""
    rng = random.Random(seed)
    pairs = set()
    while len(pairs) < count:
        full = [rng.randint(1, 4) for _ in range(rng.randint(1, 3))]
        a = tuple(n if rng.random() < 0.5 else 1 for n in full)
        b = tuple(n if rng.random() < 0.5 else 1 for n in full)
        pairs.add((a, b[rng.randint(0, len(full) - 1):]))
    return sorted(pairs)


@pytest.mark.parametrize("shapes", broadcastable_shapes(25), ids=str)
def test_broadcasting_shapes(shapes):
    sa, sb = shapes
    g = torch.Generator().manual_seed(zlib.crc32(repr(shapes).encode()))
    x = torch.randn(sa, generator=g, dtype=F64)
    y = torch.randn(sb, generator=g, dtype=F64)
    assert_matches_autograd(broadcast_ops, x, y, wrt=(0, 1))


# --------------------------------------------------------------------------------------------
# Opaque calls: nn.Module, source-less functions, untemplated ops, reached leaves
# --------------------------------------------------------------------------------------------


def test_opaque_nn_linear_module():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3).double()

    def f(x):
        return torch.tanh(lin(x)).pow(2).sum()

    x = rn(5, 4)
    # autograd reference, then reset the module's grads
    xr = x.clone().requires_grad_(True)
    f(xr).backward()
    exp_x, exp_w, exp_b = xr.grad, lin.weight.grad.clone(), lin.bias.grad.clone()
    lin.zero_grad(set_to_none=True)

    df = propgen.grad(f)
    gx = df(x)
    torch.testing.assert_close(gx, exp_x, **H.TIGHT64)
    assert lin.weight.grad is not None, "module parameters reached by f got no .grad"
    torch.testing.assert_close(lin.weight.grad, exp_w, **H.TIGHT64)
    torch.testing.assert_close(lin.bias.grad, exp_b, **H.TIGHT64)
    assert "opaque" in propgen.source(df)

    # .grad accumulates across calls as with loss.backward()
    df(x)
    torch.testing.assert_close(lin.weight.grad, 2 * exp_w, **H.TIGHT64)


def test_opaque_module_in_loop_and_wrt_params_untouched():
    torch.manual_seed(0)
    cell = torch.nn.Linear(3, 3).double()

    def f(x, w):
        h = x
        for _ in range(4):
            h = torch.tanh(cell(h) * w)
        return h.sum()

    x, w = rn(2, 3), rn(3)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    f(xr, wr).backward()
    exp = (xr.grad, wr.grad, cell.weight.grad.clone())
    cell.zero_grad(set_to_none=True)
    gx, gw = propgen.grad(f, wrt=(0, 1))(x, w)
    torch.testing.assert_close(gx, exp[0], **H.TIGHT64)
    torch.testing.assert_close(gw, exp[1], **H.TIGHT64)
    torch.testing.assert_close(cell.weight.grad, exp[2], **H.TIGHT64)
    # inputs of propgen's gradient function are not turned into autograd leaves
    assert not x.requires_grad and x.grad is None


G_LEAF = torch.randn(4, dtype=F64, generator=torch.Generator().manual_seed(7)).requires_grad_()


def uses_global_leaf(x):
    return (torch.sin(x) * G_LEAF).sum() + (G_LEAF * G_LEAF).sum()


def test_global_leaf_gets_grad():
    G_LEAF.grad = None
    x = rn(4)
    gx = propgen.grad(uses_global_leaf)(x)
    torch.testing.assert_close(gx, torch.cos(x) * G_LEAF.detach(), **H.TIGHT64)
    assert G_LEAF.grad is not None, "a global leaf with requires_grad got no .grad"
    expected = torch.sin(x) + 2 * G_LEAF.detach()
    torch.testing.assert_close(G_LEAF.grad, expected, **H.TIGHT64)
    propgen.grad(uses_global_leaf)(x)
    torch.testing.assert_close(G_LEAF.grad, 2 * expected, **H.TIGHT64)
    G_LEAF.grad = None


def test_closure_leaf_gets_grad():
    c = rn(3).requires_grad_()

    def f(x):
        return (x.exp() * c).sum()

    x = rn(3)
    gx = propgen.grad(f)(x)
    torch.testing.assert_close(gx, x.exp() * c.detach(), **H.TIGHT64)
    assert c.grad is not None
    torch.testing.assert_close(c.grad, x.exp(), **H.TIGHT64)


def _scripted(x):
    return torch.sin(x) * x + 1.0


with warnings.catch_warnings():  # torch.jit.script is deprecated in recent torch
    warnings.simplefilter("ignore", DeprecationWarning)
    scripted_fn = torch.jit.script(_scripted)


def test_opaque_jit_scripted_function():
    def f(x):
        return (scripted_fn(x) ** 2).sum()

    df = assert_matches_autograd(f, rn(5))
    assert "opaque" in propgen.source(df)


_ns: dict = {}
exec("def no_source(x, y):\n    return torch.cos(x) * y + x * x\n", {"torch": torch}, _ns)
no_source = _ns["no_source"]


def test_opaque_function_without_source():
    def f(x, y):
        return no_source(x, y).exp().sum()

    df = assert_matches_autograd(f, rn(4), rn(4), wrt=(0, 1))
    assert "opaque" in propgen.source(df)


def test_opaque_untemplated_torch_op():
    # torch.special.log_ndtr has an autograd formula but (as of writing) no propgen template
    def f(x):
        return torch.special.log_ndtr(x * 2.0).sum() + x.sum()

    df = assert_matches_autograd(f, rn(6))
    assert "opaque" in propgen.source(df)


def test_opaque_module_with_tuple_input_and_output():
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(3, 4).double()

    def f(xs, h0):
        h, c = h0, torch.zeros_like(h0)
        for t in range(xs.shape[0]):
            h, c = cell(xs[t], (h, c))
        return (h * h).sum() + c.sum()

    xs, h0 = rn(5, 2, 3), rn(2, 4)
    xr, hr = xs.clone().requires_grad_(True), h0.clone().requires_grad_(True)
    f(xr, hr).backward()
    exp = (xr.grad, hr.grad, cell.weight_ih.grad.clone(), cell.bias_hh.grad.clone())
    cell.zero_grad(set_to_none=True)
    df = propgen.grad(f, wrt=(0, 1))
    gx, gh = df(xs, h0)
    torch.testing.assert_close(gx, exp[0], **H.TIGHT64)
    torch.testing.assert_close(gh, exp[1], **H.TIGHT64)
    assert cell.weight_ih.grad is not None
    torch.testing.assert_close(cell.weight_ih.grad, exp[2], **H.TIGHT64)
    torch.testing.assert_close(cell.bias_hh.grad, exp[3], **H.TIGHT64)
    assert "opaque" in propgen.source(df)


# --------------------------------------------------------------------------------------------
# State the caller sees after the call; running the backward more than once
# --------------------------------------------------------------------------------------------


def fill_buffer(x, buf, rows):
    for i in range(3):
        buf[i] = x[i] * buf[i] + 1.0
        rows.append(buf[i] * 2.0)
    return (buf * buf).sum() + sum(rows).sum()


def fill_buffer_for_autograd(x, buf, rows):
    """fill_buffer with its reads copied: autograd rejects overwriting what it saved."""
    for i in range(3):
        buf[i] = x[i] * buf[i].clone() + 1.0
        rows.append(buf[i] * 2.0)
    return (buf * buf).sum() + sum(rows).sum()


def test_argument_buffers_and_lists_hold_what_the_function_left():
    x = rn(3, 2)
    buf, rows = torch.ones(3, 2, dtype=F64), []
    want_buf, want_rows = buf.clone(), []
    fill_buffer(x, want_buf, want_rows)
    df = propgen.grad(fill_buffer)
    g = df(x, buf, rows)
    torch.testing.assert_close(buf, want_buf, **H.TIGHT64)
    assert len(rows) == len(want_rows)
    for got, want in zip(rows, want_rows):
        torch.testing.assert_close(got, want, **H.TIGHT64)
    xr = x.clone().requires_grad_(True)
    fill_buffer_for_autograd(xr, torch.ones(3, 2, dtype=F64), []).backward()
    torch.testing.assert_close(g, xr.grad, **H.TIGHT64)


def test_backward_runs_again_on_the_same_saved_values():
    x = rn(3, 2)
    df = propgen.grad(fill_buffer)
    result, saved = df.forward(x, torch.ones(3, 2, dtype=F64), [])
    first = df.backward(saved, torch.tensor(1.0, dtype=F64))[0]
    second = df.backward(saved, torch.tensor(2.0, dtype=F64))[0]
    torch.testing.assert_close(second, 2 * first, **H.TIGHT64)
    xr = x.clone().requires_grad_(True)
    fill_buffer_for_autograd(xr, torch.ones(3, 2, dtype=F64), []).backward()
    torch.testing.assert_close(first, xr.grad, **H.TIGHT64)


class _TwoLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(4, 6).double()
        self.l2 = torch.nn.Linear(6, 1).double()
        self.scale = 2.0

    def forward(self, x):
        h = torch.tanh(self.l1(x)) * self.scale
        return self.l2(h).pow(2).mean()


@pytest.mark.parametrize("how", ["bound_method", "module"])
def test_methods_and_modules(how):
    torch.manual_seed(0)
    net = _TwoLayer()
    x = rn(5, 4)
    xr = x.clone().requires_grad_(True)
    net(xr).backward()
    want = [xr.grad] + [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    df = propgen.grad(net.forward if how == "bound_method" else net)
    got = [df(x)] + [p.grad for p in net.parameters()]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **H.TIGHT64)


class _DirectParams(torch.nn.Module):
    """Parameters read as attributes (not through a submodule call)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, dtype=F64))
        self.inner = torch.nn.Linear(3, 3).double()

    def forward(self, x):
        h = torch.tanh(x * self.w) @ self.inner.weight
        return (h * h).sum() + (self.w * self.inner.bias).sum()


def reads_model_params(model, x):
    return model(x) + (model.w * model.w).sum()


@pytest.mark.parametrize("how", ["module", "bound_method", "argument"])
def test_parameters_read_as_attributes_get_grad_once(how):
    net = _DirectParams()
    x = rn(4, 3)
    fn = reads_model_params if how == "argument" else net
    (fn(net, x) if how == "argument" else net(x)).backward()
    want = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    if how == "argument":
        propgen.grad(reads_model_params, wrt=(1,))(net, x)
    else:
        propgen.grad(net.forward if how == "bound_method" else net)(x)
    for p, w in zip(net.parameters(), want):
        torch.testing.assert_close(p.grad, w, **H.TIGHT64)
