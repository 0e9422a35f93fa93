"""LMD through ``nn.MultiheadAttention``, ``F.normalize`` and vector norms: oracles written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decompose_zoo import CrossAttentionFusion
from fusionlens import decompose
from fusionlens.decompose import ModalityNotReachedWarning

E, HEADS = 8, 2


class Attend(nn.Module):
    """Queries from the camera, keys from the LiDAR, values from the radar, a residual on the queries; ``layout``
    ``batch_first`` (N, L, E), ``seq_first`` (L, N, E) or ``unbatched`` (L, E). ``written_out`` computes the same
    block with ``F.linear``, softmax and matmul instead of the module."""

    def __init__(self, layout: str, separate: bool, written_out: bool) -> None:
        super().__init__()
        kdim = 6 if separate else None  # kdim != embed_dim: separate q/k/v projection weights
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=layout == "batch_first", kdim=kdim, vdim=kdim)
        self.layout, self.written_out = layout, written_out

    def forward(self, camera, lidar, radar, key_padding_mask=None, attn_mask=None):
        if self.written_out:
            out = self.by_hand(camera, lidar, radar, key_padding_mask, attn_mask)
        else:
            out = self.attn(camera, lidar, radar, key_padding_mask=key_padding_mask, attn_mask=attn_mask)[0]
        return out + camera

    def by_hand(self, query, key, value, key_padding_mask, attn_mask):
        a = self.attn
        if self.layout == "seq_first":
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        elif self.layout == "unbatched":
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if a._qkv_same_embed_dim:
            wq, wk, wv = a.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = a.q_proj_weight, a.k_proj_weight, a.v_proj_weight
        bq, bk, bv = a.in_proj_bias.chunk(3)
        d = E // HEADS

        def heads(x):  # (N, S, E) -> (N, H, S, d)
            return x.unflatten(-1, (HEADS, d)).transpose(1, 2)

        q, k, v = heads(F.linear(query, wq, bq)), heads(F.linear(key, wk, bk)), heads(F.linear(value, wv, bv))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        if attn_mask is not None:  # nn.MultiheadAttention: True = not allowed; a float mask is added
            scores = scores.masked_fill(attn_mask, -math.inf) if attn_mask.dtype == torch.bool else scores + attn_mask
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], -math.inf)
        out = (torch.softmax(scores, -1) @ v).transpose(1, 2).flatten(2)
        out = F.linear(out, a.out_proj.weight, a.out_proj.bias)
        if self.layout == "seq_first":
            return out.transpose(0, 1)
        return out.squeeze(0) if self.layout == "unbatched" else out


def _inputs(layout: str, separate: bool, masks: str):
    g = torch.Generator().manual_seed(0)
    n, lq, lk = 2, 4, 5
    kdim = 6 if separate else E
    shape = {"batch_first": lambda length, c: (n, length, c), "seq_first": lambda length, c: (length, n, c),
             "unbatched": lambda length, c: (length, c)}[layout]
    inputs = {"camera": torch.randn(shape(lq, E), generator=g, dtype=torch.float64),
              "lidar": torch.randn(shape(lk, kdim), generator=g, dtype=torch.float64),
              "radar": torch.randn(shape(lk, kdim), generator=g, dtype=torch.float64)}
    kwargs = {}
    if masks in ("padding", "both"):
        padding = torch.zeros(n, lk, dtype=torch.bool)
        padding[0, -2:] = True
        kwargs["key_padding_mask"] = padding[0] if layout == "unbatched" else padding
    if masks == "float":
        kwargs["attn_mask"] = torch.randn(lq, lk, generator=g, dtype=torch.float64)
    if masks == "both":
        kwargs["attn_mask"] = torch.rand(lq, lk, generator=g) > 0.7
        kwargs["attn_mask"][:, 0] = False  # every query keeps a key
    return inputs, kwargs


@pytest.mark.parametrize("masks", ["none", "padding", "float", "both"])
@pytest.mark.parametrize("layout, separate", [("batch_first", False), ("seq_first", False), ("unbatched", False),
                                              ("batch_first", True)])
def test_multihead_attention_equals_the_block_written_out(layout, separate, masks):
    """Every component of ``nn.MultiheadAttention`` (fused kernels, its own masks and layouts) equals the component
    of the same block written out with F.linear, softmax and matmul through the engine; the key modality, which
    only steers the weights, is reported by a warning naming the op that held it constant."""
    torch.manual_seed(0)
    module = Attend(layout, separate, written_out=False).double().eval()
    by_hand = Attend(layout, separate, written_out=True).double().eval()
    by_hand.load_state_dict(module.state_dict())
    inputs, kwargs = _inputs(layout, separate, masks)
    with pytest.warns(ModalityNotReachedWarning, match="'lidar' .* op 'multi_head_attention_forward' in module 'attn'"):
        d = decompose(module, inputs, forward_kwargs=kwargs)
    with pytest.warns(ModalityNotReachedWarning, match="'lidar' .* op 'softmax'"):
        want = decompose(by_hand, inputs, forward_kwargs=kwargs)
    assert torch.equal(d.output, module(**inputs, **kwargs))
    torch.testing.assert_close(d.output, want.output, rtol=0, atol=1e-12)
    for name in d.names:
        torch.testing.assert_close(d.components[name], want.components[name], rtol=0, atol=1e-12)
    assert d.components["radar"].abs().max() > 0.1 and d.conservation_error().relative <= 1e-13
    assert torch.equal(d.components["lidar"], torch.zeros_like(d.output))


@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_fuser_camera_lidar(batch_first):
    """The zoo's camera-LiDAR cross-attention fuser: conserves in both bias modes, LiDAR reaches the output through
    the attention's values, and frozen coefficients keep the camera component when the LiDAR points change."""
    torch.manual_seed(0)
    model = CrossAttentionFusion(batch_first=batch_first).double().eval()
    g = torch.Generator().manual_seed(1)
    cam = torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float64)
    lidar, other = (torch.randn(2, 6, 4, generator=g, dtype=torch.float64) for _ in range(2))
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    kwargs = {"padding": padding}
    for bias in ("local", "global"):
        d = decompose(model, {"camera": cam, "lidar": lidar}, forward_kwargs=kwargs, bias=bias,
                      record_coefficients=True)
        assert torch.equal(d.output, model(cam, lidar, padding))
        assert d.conservation_error().relative <= 1e-12
        assert min(d.components[n].abs().max() for n in ("camera", "lidar")) > 1e-3
    moved = decompose(model, {"camera": cam, "lidar": other}, forward_kwargs=kwargs, coefficients=d.coefficients,
                      bias="global")
    torch.testing.assert_close(moved.components["camera"], d.components["camera"], rtol=0, atol=0)
    assert (moved.components["lidar"] - d.components["lidar"]).abs().max() > 1e-3


class CosineAttention(nn.Module):
    """Swin v2's scaled cosine attention, written as people write it: normalised queries and keys, a learned
    logit scale, softmax, values; plus a norm-weighted term."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, camera, radar):
        q, k, v = self.qkv(camera + radar).chunk(3, -1)
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * self.logit_scale.exp()
        return scores.softmax(-1) @ v + F.normalize(v, dim=-1) + v.norm(dim=-1, keepdim=True)


def test_normalize_and_norm_by_hand():
    """``F.normalize(x)``: component h_m / ||A|| (the norm of the total held constant); ``||x||``: component
    <A / ||A||, h_m> (Euler's identity for a degree-1 homogeneous function) -- both summing to the output."""
    class Only(nn.Module):
        def forward(self, camera, radar):
            x = camera + radar + 0.5
            return torch.cat([F.normalize(x, dim=-1), x.norm(dim=-1, keepdim=True),
                              torch.linalg.vector_norm(x, ord=1, dim=-1, keepdim=True)], -1)

    g = torch.Generator().manual_seed(0)
    cam, rad = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    d = decompose(Only().eval(), {"camera": cam, "radar": rad})
    total = cam + rad + 0.5
    length = total.norm(dim=-1, keepdim=True)
    for name, h in (("camera", cam), ("radar", rad)):
        want = torch.cat([h / length, (total / length * h).sum(-1, keepdim=True),
                          (total.sign() * h).sum(-1, keepdim=True)], -1)
        torch.testing.assert_close(d.components[name], want, rtol=0, atol=1e-12)
    assert d.conservation_error().relative <= 1e-13
    d = decompose(CosineAttention().double().eval(), {"camera": cam.unsqueeze(0), "radar": rad.unsqueeze(0)},
                  bias="global")
    assert d.conservation_error().relative <= 1e-13


def test_cross_attention_replays_one_samples_coefficients_on_a_batch():
    """Attention weights recorded on one sample replay on a batch (each row as that sample replayed alone), and a
    replay without the output (shapes only) gives the same modality components."""
    torch.manual_seed(0)
    model = CrossAttentionFusion().double().eval()
    g = torch.Generator().manual_seed(2)

    def make(b):
        return {"camera": torch.randn(b, 3, 3, 3, generator=g, dtype=torch.float64),
                "lidar": torch.randn(b, 6, 4, generator=g, dtype=torch.float64)}

    clean = decompose(model, make(1), record_coefficients=True)
    batch = make(3)
    together = decompose(model, batch, coefficients=clean.coefficients)
    lite = decompose(model, batch, coefficients=clean.coefficients, with_output=False)
    for i in range(3):
        alone = decompose(model, {k: v[i:i + 1] for k, v in batch.items()}, coefficients=clean.coefficients)
        for name in ("camera", "lidar"):
            torch.testing.assert_close(together.components[name][i:i + 1], alone.components[name], rtol=0, atol=1e-12)
    for name in ("camera", "lidar"):
        torch.testing.assert_close(lite.components[name], together.components[name], rtol=0, atol=1e-12)
