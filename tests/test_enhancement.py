"""Guided enhancement and SGE against direct per-sample loop computations; padding never leaks in."""

import math

import pytest
import torch

from xmcl.retrieval.enhancement import SGE, guided_enhancement

LENGTHS = [4, 1, 6]


def batch(dim=5, seed=0):
    """Locals (B, max(LENGTHS), dim) with zero pads, and their lengths."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(LENGTHS), max(LENGTHS), dim, generator=gen)
    return repad(x, max(LENGTHS), 0.0), torch.tensor(LENGTHS)


def repad(x, pad_to, pad_value):
    """The same valid locals padded to ``pad_to`` with ``pad_value``."""
    out = torch.full((x.shape[0], pad_to, x.shape[2]), pad_value)
    for b, n in enumerate(LENGTHS):
        out[b, :n] = x[b, :n]
    return out


def loop_guided(local, guide, lam, lengths=LENGTHS):
    """v_i + a_i g with a = softmax(lam <g, v_i>) / ||softmax||_2, written out with Python floats."""
    out = local.clone()
    for b, n in enumerate(lengths):
        g = guide[b].tolist()
        scores = [lam * sum(gi * vi for gi, vi in zip(g, local[b, i].tolist())) for i in range(n)]
        top = max(scores)
        exp = [math.exp(s - top) for s in scores]
        p = [e / sum(exp) for e in exp]
        norm = math.sqrt(sum(q * q for q in p))
        for i in range(n):
            out[b, i] = torch.tensor([v + p[i] / norm * gi for v, gi in zip(local[b, i].tolist(), g)])
    return out


@pytest.mark.parametrize("lam", [1.0, 4.0])
def test_guided_enhancement_matches_a_loop(lam):
    local, lengths = batch()
    guide = torch.randn(len(LENGTHS), 5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(guided_enhancement(local, lengths, guide, lam), loop_guided(local, guide, lam))


def test_uniform_attention_adds_guide_over_sqrt_n():
    local = torch.ones(1, 4, 3)
    guide = torch.tensor([[1.0, 0.0, -1.0]])
    out = guided_enhancement(local, torch.tensor([4]), guide)
    torch.testing.assert_close(out, local + guide / 2)  # a_i = 1/sqrt(4)


def test_guided_enhancement_ignores_pads():
    local, lengths = batch()
    noisy = repad(local, 9, 1e4)
    guide = torch.randn(len(LENGTHS), 5)
    clean_out = guided_enhancement(local, lengths, guide)
    noisy_out = guided_enhancement(noisy, lengths, guide)
    for b, n in enumerate(LENGTHS):
        torch.testing.assert_close(noisy_out[b, :n], clean_out[b, :n])
        assert torch.all(noisy_out[b, n:] == 1e4)  # pads pass through unchanged


def loop_sge(sge, local, lengths=LENGTHS):
    """SGE in eval mode, per sample: g0 = mean, w = softmax(w_c . tanh(BN W_l v_i) * tanh(BN W_g g0))."""

    def branch(seq, x):
        linear, norm = seq[0], seq[1]
        y = linear(x)
        y = (y - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
        return torch.tanh(y)

    guides = torch.zeros(local.shape[0], local.shape[2])
    for b, n in enumerate(lengths):
        v = local[b, :n]
        gate = branch(sge.global_branch, v.mean(0))
        scores = [sge.scorer(branch(sge.local_branch, v[i]) * gate).item() for i in range(n)]
        weights = [math.exp(s - max(scores)) for s in scores]
        pooled = sum(w * v[i] for i, w in enumerate(weights)) / sum(weights)
        guides[b] = pooled / pooled.norm()
    return guides, loop_guided(local, guides, sge.lam, lengths)


def test_sge_matches_a_loop_in_eval_mode():
    torch.manual_seed(0)
    sge = SGE(5, lam=2.0)
    for norm in (sge.local_branch[1], sge.global_branch[1]):  # non-trivial running statistics
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    sge.eval()
    local, lengths = batch()
    guides, expected = loop_sge(sge, local)
    with torch.no_grad():
        torch.testing.assert_close(sge.guide(local, lengths), guides, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sge(local, lengths), expected, atol=1e-5, rtol=1e-5)


def test_sge_over_complete_sets_in_eval_mode_matches_a_loop():
    """Nothing padded: the eval path folds BN and tanh's doubling into one product (``SGE.local_scores``)."""
    torch.manual_seed(4)
    sge = SGE(5, lam=1.5)
    for norm in (sge.local_branch[1], sge.global_branch[1]):
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-0.3, 0.3)
    sge.eval()
    local, lengths = torch.randn(3, 6, 5), [6, 6, 6]
    guides, expected = loop_sge(sge, local, lengths)
    with torch.no_grad():
        torch.testing.assert_close(sge.guide(local, torch.tensor(lengths)), guides, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sge(local, torch.tensor(lengths)), expected, atol=1e-5, rtol=1e-5)


def test_sge_in_training_ignores_pads_even_in_its_batch_statistics():
    torch.manual_seed(1)
    sge = SGE(5, dropout=0.0).train()
    local, lengths = batch()
    noisy = repad(local, 10, -3e3)
    clean_out, noisy_out = sge(local, lengths), sge(noisy, lengths)
    for b, n in enumerate(LENGTHS):
        torch.testing.assert_close(noisy_out[b, :n], clean_out[b, :n])
    # the local branch's batch mean is the mean over the valid locals only
    valid = torch.cat([local[b, :n] for b, n in enumerate(LENGTHS)])
    expected_mean = sge.local_branch[0](valid).mean(0).detach()
    fresh = SGE(5, dropout=0.0).train()
    fresh.load_state_dict(sge.state_dict())
    fresh.local_branch[1].reset_running_stats()
    fresh.local_branch[1].momentum = 1.0  # running mean := this batch's mean
    fresh(noisy, lengths)
    torch.testing.assert_close(fresh.local_branch[1].running_mean, expected_mean, atol=1e-5, rtol=1e-5)


def test_sge_gradients_do_not_reach_pads():
    torch.manual_seed(2)
    sge = SGE(5, dropout=0.0).train()
    local, lengths = batch()
    local.requires_grad_(True)
    sge(local, lengths)[torch.arange(len(LENGTHS)), 0].sum().backward()
    for b, n in enumerate(LENGTHS):
        assert torch.all(local.grad[b, n:] == 0)


def test_sge_without_padding_equals_the_masked_path_in_training():
    torch.manual_seed(3)
    sge = SGE(5, dropout=0.0).train()
    local = torch.randn(3, 4, 5)
    lengths = torch.full((3,), 4)
    padded = torch.cat([local, torch.full((3, 1, 5), 9.0)], dim=1)  # one pad column: the gather path runs
    twin = SGE(5, dropout=0.0).train()
    twin.load_state_dict(sge.state_dict())
    torch.testing.assert_close(sge(local, lengths), twin(padded, lengths)[:, :4])
    torch.testing.assert_close(sge.local_branch[1].running_mean, twin.local_branch[1].running_mean)
    torch.testing.assert_close(sge.local_branch[1].running_var, twin.local_branch[1].running_var)


def _attention_as_first_written(sge, local, lengths):
    """SGE's training-mode attention over complete sets as first written: ``torch.tanh``, and the scorer applied to
    the (B, R, d) product ``h * gate``."""
    linear, norm = sge.local_branch[0], sge.local_branch[1]
    gate = torch.tanh(sge.global_branch[1](sge.global_branch[0](local.mean(dim=1))))
    hidden = torch.tanh(norm(linear(local.reshape(-1, local.size(-1))))).view_as(local)
    return torch.softmax(sge.scorer(hidden * gate.unsqueeze(1)).squeeze(-1), dim=1)


def test_sge_attention_and_its_gradients_equal_the_first_written_form_in_training():
    torch.manual_seed(7)
    sge = SGE(16, dropout=0.0).train()
    reference = SGE(16, dropout=0.0).train()
    reference.load_state_dict(sge.state_dict())
    local = torch.randn(6, 9, 16)
    lengths = torch.full((6,), 9)
    mine, theirs = local.clone().requires_grad_(True), local.clone().requires_grad_(True)
    weights = torch.randn(6, 9)
    got, expected = sge.attention(mine, lengths), _attention_as_first_written(reference, theirs, lengths)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(sge.named_parameters(), reference.parameters()):
        if name == "local_branch.0.bias":  # the BN cancels it: an exact 0 here, rounding noise in the reference
            assert not p.grad.any() and q.grad.abs().max() < 1e-5
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(sge.local_branch[1].running_mean, reference.local_branch[1].running_mean)


def test_row_dot_and_its_gradients_equal_the_product_and_sum():
    """``row_dot``'s hand-written backward against autograd through ``(x * v).sum(-1)``, for the (B, R, d) x (B, 1, d)
    case it takes and a shape it leaves to the plain form."""
    from xmcl.retrieval.enhancement import row_dot

    torch.manual_seed(21)
    for x_shape, v_shape in (((3, 5, 4), (3, 1, 4)), ((6, 4), (6, 4))):
        x, v = torch.randn(x_shape, requires_grad=True), torch.randn(v_shape, requires_grad=True)
        x2, v2 = x.detach().clone().requires_grad_(True), v.detach().clone().requires_grad_(True)
        weights = torch.randn(x_shape[:-1])
        got, expected = row_dot(x, v), (x2 * v2).sum(-1)
        torch.testing.assert_close(got, expected)
        (got * weights).sum().backward()
        (expected * weights).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(v.grad, v2.grad)
