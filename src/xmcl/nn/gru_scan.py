"""A bidirectional GRU for a few short sequences (GPO's rank encodings), as one loop over time with a hand-written
backward.

``nn.GRU`` over a packed batch of a few sequences spends its time per operator, not per FLOP: about 15 small
operators per time step and direction, each one an autograd node. Here the two directions run side by side as one
batch of 2 (the backward direction reads each sequence reversed within its length, so that its padding comes
last and never reaches a valid state), the input products of all steps are one ``bmm``, and a step is six
operators writing into preallocated buffers, on one thread (``one_thread``: splitting products this small over
threads costs more than it saves). The backward pass is linear in the state gradient ``dh`` with
coefficients that depend on the saved forward values alone, so those are computed for all steps at once and a
backward step is four operators. With ``r, z, n`` the gates of ``nn.GRU`` (rows ``[r; z; n]`` of its weights)::

    r = sigmoid(gi_r + gh_r)        gi = W_ih x + b_ih,  gh = W_hh h + b_hh
    z = sigmoid(gi_z + gh_z)
    n = tanh(gi_n + r * gh_n)
    h' = n + z * (h - n)

    backward, given dh' (the output's gradient plus the next step's):
    d gi_n = dh' (1 - z)(1 - n^2)           d gh_n = d gi_n r
    d gi_r = d gh_r = d gi_n gh_n r (1 - r)
    d gi_z = d gh_z = dh' (h - n) z (1 - z)
    dh = dh' z + W_hh^T d gh
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from xmcl.nn.sequence import length_mask
from xmcl.runtime.threads import one_thread


class _DirectionsScan(torch.autograd.Function):
    """GRU recurrences of two directions at once: ``x (L, 2, B, D)``, weights ``(2, 3H, D)``, ``(2, 3H, H)``,
    biases ``(2, 3H)`` -> every step's state ``(L, 2, B, H)`` from a zero initial state."""

    @staticmethod
    def forward(ctx, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
        steps, _, batch, _ = x.shape
        hidden = w_hh.shape[2]
        gi = torch.baddbmm(b_ih.unsqueeze(1), x.transpose(0, 1).reshape(2, steps * batch, -1), w_ih.transpose(1, 2))
        gi = gi.view(2, steps, batch, 3 * hidden).transpose(0, 1).contiguous()  # (L, 2, B, 3H)
        states = x.new_empty(steps + 1, 2, batch, hidden)
        states[0] = 0
        gh = x.new_empty(steps, 2, batch, 3 * hidden)
        rz = x.new_empty(steps, 2, batch, 2 * hidden)
        n = x.new_empty(steps, 2, batch, hidden)
        w_hh_t, b_hh = w_hh.transpose(1, 2), b_hh.unsqueeze(1)
        # per-step views made once (unbind): the loop then indexes Python lists, not tensors
        gi_rz, gi_n = (part.unbind(0) for part in gi.split([2 * hidden, hidden], dim=-1))
        gh_rz, gh_n = (part.unbind(0) for part in gh.split([2 * hidden, hidden], dim=-1))
        r, z = (part.unbind(0) for part in rz.split([hidden, hidden], dim=-1))
        gh_t, rz_t, n_t, h = gh.unbind(0), rz.unbind(0), n.unbind(0), states.unbind(0)
        with one_thread():
            for t in range(steps):
                torch.baddbmm(b_hh, h[t], w_hh_t, out=gh_t[t])
                torch.sigmoid(gi_rz[t] + gh_rz[t], out=rz_t[t])
                torch.tanh(torch.addcmul(gi_n[t], r[t], gh_n[t]), out=n_t[t])
                torch.lerp(n_t[t], h[t], z[t], out=h[t + 1])
        ctx.save_for_backward(x, w_ih, w_hh, states, gh, rz, n)
        return states[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_states: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        x, w_ih, w_hh, states, gh, rz, n = ctx.saved_tensors
        steps, _, batch, hidden = grad_states.shape
        r, z = rz[..., :hidden], rz[..., hidden:]
        previous = states[:-1]
        d_new = (1 - z) * (1 - n * n)  # d gi_n / dh'
        # d gh / dh' per gate (L, 2, B, 3, H): r, z, n
        coefficients = torch.stack([d_new * gh[..., 2 * hidden:] * r * (1 - r), (previous - n) * z * (1 - z),
                                    d_new * r], dim=3)
        d_gh = grad_states.new_empty(steps, 2, batch, 3 * hidden)
        d_out = grad_states.new_empty(steps, 2, batch, hidden)  # dh' of each step
        d_gh_t = d_gh.view(steps, 2, batch, 3, hidden).unbind(0)
        d_out_t, grad_t, z_t = d_out.unbind(0), grad_states.unbind(0), z.unbind(0)
        coefficients_t = coefficients.unbind(0)
        d_h = grad_states.new_zeros(2, batch, hidden)
        with one_thread():
            for t in range(steps - 1, -1, -1):
                torch.add(d_h, grad_t[t], out=d_out_t[t])
                torch.mul(d_out_t[t].unsqueeze(2), coefficients_t[t], out=d_gh_t[t])
                d_h = torch.baddbmm(d_out_t[t] * z_t[t], d_gh_t[t].view(2, batch, 3 * hidden), w_hh)
        d_gi = d_gh.clone()
        d_gi[..., 2 * hidden:] = d_out * d_new
        flat_gi = d_gi.transpose(0, 1).reshape(2, steps * batch, 3 * hidden)
        flat_gh = d_gh.transpose(0, 1).reshape(2, steps * batch, 3 * hidden)
        flat_x = x.transpose(0, 1).reshape(2, steps * batch, -1)
        flat_previous = previous.transpose(0, 1).reshape(2, steps * batch, hidden)
        d_x = torch.bmm(flat_gi, w_ih).view(2, steps, batch, -1).transpose(0, 1)
        return (d_x, torch.bmm(flat_gi.transpose(1, 2), flat_x), torch.bmm(flat_gh.transpose(1, 2), flat_previous),
                flat_gi.sum(dim=1), flat_gh.sum(dim=1))


def bidirectional_gru_mean(x: Tensor, lengths: Tensor, gru: nn.GRU) -> Tensor:
    """What ``xmcl.nn.sequence.BiGRU`` computes with ``gru`` (one bidirectional layer, ``batch_first``): for ``x
    (B, L, D)`` whose row ``b`` is valid up to ``lengths[b]``, the mean of the forward and backward states at each
    position ``(B, L, H)``, 0 at padded positions. Float32 or float64, outside autocast."""
    if gru.num_layers != 1 or not gru.bidirectional or not gru.batch_first or not gru.bias:
        raise ValueError("bidirectional_gru_mean needs a one-layer, bidirectional, batch_first GRU with biases")
    batch, steps, _ = x.shape
    mask = length_mask(lengths, steps)
    lengths = lengths.to(x.device).long()
    position = torch.arange(steps, device=x.device)
    reversed_position = (lengths.unsqueeze(1) - 1 - position).clamp(min=0)  # (B, L); padded steps read position 0
    backward_input = x.gather(1, reversed_position.unsqueeze(2).expand_as(x))
    both = torch.stack([x, backward_input]).transpose(1, 2).transpose(0, 1)  # (L, 2, B, D)
    with torch.autocast(x.device.type, enabled=False):
        states = _DirectionsScan.apply(
            both, torch.stack([gru.weight_ih_l0, gru.weight_ih_l0_reverse]),
            torch.stack([gru.weight_hh_l0, gru.weight_hh_l0_reverse]),
            torch.stack([gru.bias_ih_l0, gru.bias_ih_l0_reverse]),
            torch.stack([gru.bias_hh_l0, gru.bias_hh_l0_reverse]))
    forward_states = states[:, 0].transpose(0, 1)  # (B, L, H)
    back_index = reversed_position.unsqueeze(2).expand(-1, -1, gru.hidden_size)
    backward_states = states[:, 1].transpose(0, 1).gather(1, back_index)
    return ((forward_states + backward_states) / 2).masked_fill(~mask.unsqueeze(2), 0)
