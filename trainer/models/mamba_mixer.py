"""Nemotron-H's Mamba2 mixer for training: fused kernels when present, a PyTorch reference otherwise, and packed
samples kept apart in both.

`install(model)` swaps each `NemotronHMamba2Mixer.forward` for `mixer_forward` (same parameters, same outputs) and
adds a forward pre-hook on the backbone that derives `seq_idx [B, S]` (int32, sample number within the row) from
`position_ids` restarting at 0, the way the data pipeline packs samples. transformers passes extra keyword arguments
from the backbone down to every mixer, so each Mamba2 layer receives it:
- kernel path (CUDA + mamba-ssm + causal-conv1d): `mamba_split_conv1d_scan_combined(..., seq_idx=...)`; the conv
  and the scan both restart at sample boundaries;
- reference path: the causal conv and the chunked SSD scan run per sample from a zero state, so a packed row gives
  what the samples give one by one.
Calls with a cache (generation) keep transformers' own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from trainer.kernels import mamba as mamba_kernels

MIXER_CLASS_NAME = "NemotronHMamba2Mixer"
IMPLEMENTATIONS = ("auto", "kernel", "reference")


def seq_idx_from_position_ids(position_ids_BS: torch.Tensor) -> torch.Tensor:
    """[B, S] positions -> [B, S] int32 sample index within each row (a sample starts where positions do not
    continue by +1, which covers restarts at 0; the same rule transformers uses for packed attention masks)."""
    starts_BS = torch.ones_like(position_ids_BS, dtype=torch.bool)
    starts_BS[:, 1:] = position_ids_BS[:, 1:] != position_ids_BS[:, :-1] + 1
    return (starts_BS.cumsum(dim=-1) - 1).to(torch.int32)


def _segsum(a_TL: torch.Tensor) -> torch.Tensor:
    """[..., L] -> [..., L, L]: out[i, j] = a[j+1] + ... + a[i] for i >= j, -inf above the diagonal."""
    length = a_TL.shape[-1]
    a_LL = a_TL[..., None].expand(*a_TL.shape, length)
    strictly_lower = torch.tril(torch.ones(length, length, device=a_TL.device, dtype=torch.bool), diagonal=-1)
    sums_LL = a_LL.masked_fill(~strictly_lower, 0).cumsum(dim=-2)
    lower = torch.tril(torch.ones(length, length, device=a_TL.device, dtype=torch.bool), diagonal=0)
    return sums_LL.masked_fill(~lower, -torch.inf)


def ssd_scan_reference(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size, D_H, dt_bias_H, dt_limit):
    """Mamba2 SSD scan from a zero state, chunked (the "minimal SSD" algorithm), in fp32.

    x [b, l, h, p], dt [b, l, h] (before bias and softplus), A [h] (negative), B/C [b, l, g, n] -> y [b, l, h, p] fp32.
    """
    batch, length, heads, head_dim = x_BLHP.shape
    dt_BLH = F.softplus(dt_BLH.float() + dt_bias_H.float()).clamp(dt_limit[0], dt_limit[1])
    x_BLHP = x_BLHP.float()
    repeat = heads // B_BLGN.shape[2]
    B_BLHN = B_BLGN.float().repeat_interleave(repeat, dim=2)
    C_BLHN = C_BLGN.float().repeat_interleave(repeat, dim=2)

    pad = (-length) % chunk_size  # zero padding at the end: A*dt = 0 there and nothing flows backwards
    xdt = F.pad(x_BLHP * dt_BLH[..., None], (0, 0, 0, 0, 0, pad))
    Adt = F.pad(A_H.float() * dt_BLH, (0, 0, 0, pad))
    B_BLHN, C_BLHN = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (B_BLHN, C_BLHN))
    chunks = (length + pad) // chunk_size
    xdt_BCLHP = xdt.view(batch, chunks, chunk_size, heads, head_dim)
    B_BCLHN = B_BLHN.view(batch, chunks, chunk_size, heads, -1)
    C_BCLHN = C_BLHN.view(batch, chunks, chunk_size, heads, -1)
    Adt_BHCL = Adt.view(batch, chunks, chunk_size, heads).permute(0, 3, 1, 2)
    Acum_BHCL = Adt_BHCL.cumsum(dim=-1)

    # within each chunk: attention-like product with the decay mask
    decay_BHCLL = torch.exp(_segsum(Adt_BHCL))
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C_BCLHN, B_BCLHN, decay_BHCLL, xdt_BCLHP)
    # state at the end of each chunk, then passed across chunks
    decay_to_end_BHCL = torch.exp(Acum_BHCL[..., -1:] - Acum_BHCL)
    states_BCHPN = torch.einsum("bclhn,bhcl,bclhp->bchpn", B_BCLHN, decay_to_end_BHCL, xdt_BCLHP)
    states_BCHPN = torch.cat([torch.zeros_like(states_BCHPN[:, :1]), states_BCHPN], dim=1)
    decay_chunks_BHZZ = torch.exp(_segsum(F.pad(Acum_BHCL[..., -1], (1, 0))))
    states_BCHPN = torch.einsum("bhzc,bchpn->bzhpn", decay_chunks_BHZZ, states_BCHPN)[:, :-1]
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C_BCLHN, states_BCHPN, torch.exp(Acum_BHCL))

    y_BLHP = (y_diag + y_off).reshape(batch, -1, heads, head_dim)[:, :length]
    return y_BLHP + x_BLHP * D_H.float()[:, None]


def _conv_and_scan(mixer, xBC_BLC: torch.Tensor, dt_BLH: torch.Tensor, mask_BL: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise conv + SiLU, then the SSD scan, from a zero state. Returns y [b, l, h*p] fp32."""
    batch, length, _ = xBC_BLC.shape
    weight = mixer.conv1d.weight
    xBC_BCL = F.conv1d(
        xBC_BLC.transpose(1, 2).to(weight.dtype), weight, mixer.conv1d.bias,
        padding=mixer.conv_kernel_size - 1, groups=mixer.conv_dim,
    )[..., :length]
    xBC_BLC = mixer.act(xBC_BCL).to(xBC_BLC.dtype).transpose(1, 2)
    if mask_BL is not None:
        xBC_BLC = (xBC_BLC * mask_BL[:, :, None]).to(xBC_BLC.dtype)
    groups_state = mixer.n_groups * mixer.ssm_state_size
    x, B, C = xBC_BLC.split([mixer.intermediate_size, groups_state, groups_state], dim=-1)
    y_BLHP = ssd_scan_reference(
        x.reshape(batch, length, mixer.num_heads, mixer.head_dim),
        dt_BLH,
        -torch.exp(mixer.A_log.float()),
        B.reshape(batch, length, mixer.n_groups, mixer.ssm_state_size),
        C.reshape(batch, length, mixer.n_groups, mixer.ssm_state_size),
        mixer.chunk_size,
        mixer.D,
        mixer.dt_bias,
        mixer.time_step_limit,
    )
    return y_BLHP.reshape(batch, length, -1)


def _segments(seq_idx_BS: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row, the [start, end) of each sample; None when every row holds one sample (one host sync)."""
    boundary_BS = seq_idx_BS[:, 1:] != seq_idx_BS[:, :-1]
    if not bool(boundary_BS.any()):
        return None
    length = seq_idx_BS.shape[1]
    rows = []
    for row in boundary_BS:
        cuts = [0] + (torch.nonzero(row).flatten() + 1).tolist() + [length]
        rows.append(list(zip(cuts[:-1], cuts[1:])))
    return rows


def reference_forward(mixer, x_BSD: torch.Tensor, mask_BS: torch.Tensor | None, seq_idx_BS: torch.Tensor | None):
    """The PyTorch path: [B, S, D] -> [B, S, D]; samples given by seq_idx do not see each other."""
    dtype = x_BSD.dtype
    projected = mixer.in_proj(x_BSD)
    gate, xBC, dt = projected.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    segments = _segments(seq_idx_BS) if seq_idx_BS is not None else None
    if segments is None:
        y = _conv_and_scan(mixer, xBC, dt, mask_BS)
    else:
        rows = []
        for b, row_segments in enumerate(segments):
            pieces = [
                _conv_and_scan(
                    mixer, xBC[b : b + 1, s:e], dt[b : b + 1, s:e], None if mask_BS is None else mask_BS[b : b + 1, s:e]
                )
                for s, e in row_segments
            ]
            rows.append(torch.cat(pieces, dim=1))
        y = torch.cat(rows, dim=0)
    y = mixer.norm(y, gate)
    return mixer.out_proj(y.to(dtype))


def kernel_forward(mixer, x_BSD: torch.Tensor, seq_idx_BS: torch.Tensor | None, kernels=None):
    """The fused path (conv + scan + gated RMSNorm + out_proj in one autograd function): [B, S, D] -> [B, S, D]."""
    kernels = kernels or mamba_kernels.load()
    if kernels is None:
        raise RuntimeError(f"Mamba2 kernel path requested but unavailable: {mamba_kernels.status()[1]}")
    if seq_idx_BS is not None:
        seq_idx_BS = seq_idx_BS.to(device=x_BSD.device, dtype=torch.int32).expand(x_BSD.shape[0], -1).contiguous()
    return kernels.split_conv1d_scan_combined(
        mixer.in_proj(x_BSD),
        mixer.conv1d.weight.squeeze(1),
        mixer.conv1d.bias,
        mixer.dt_bias,
        -torch.exp(mixer.A_log.float()),
        D=mixer.D,
        chunk_size=mixer.chunk_size,
        seq_idx=seq_idx_BS,
        dt_limit=mixer.time_step_limit,
        activation=mixer.activation,
        rmsnorm_weight=mixer.norm.weight,
        rmsnorm_eps=mixer.norm.variance_epsilon,
        outproj_weight=mixer.out_proj.weight,
        outproj_bias=mixer.out_proj.bias,
        headdim=mixer.head_dim,
        ngroups=mixer.n_groups,
        norm_before_gate=False,
        return_final_states=False,
    )


def mixer_forward(self, hidden_states, cache_params=None, attention_mask=None, seq_idx=None, **kwargs):
    """Replacement for `NemotronHMamba2Mixer.forward`: [B, S, D] -> [B, S, D]."""
    if cache_params is not None:  # generation: transformers' own path (decode steps, conv/SSM state updates)
        hf_forward = type(self).forward
        return hf_forward(self, hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
    if attention_mask is not None:  # a 2D padding mask (transformers passes one only when some entry is 0)
        hidden_states = (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)
    if seq_idx is not None and seq_idx.shape[0] != hidden_states.shape[0]:
        seq_idx = seq_idx.expand(hidden_states.shape[0], -1)
    implementation = getattr(self, "mamba_implementation", "auto")
    use_kernels = implementation == "kernel" or (
        implementation == "auto" and mamba_kernels.available_on(hidden_states.device)
    )
    if use_kernels:
        return kernel_forward(self, hidden_states, seq_idx)
    return reference_forward(self, hidden_states, attention_mask, seq_idx)


def _add_seq_idx(module, args, kwargs):
    """Backbone pre-hook: seq_idx from position_ids for training-style calls (no cache)."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None or "seq_idx" in kwargs or kwargs.get("past_key_values") is not None:
        return None
    kwargs["seq_idx"] = seq_idx_from_position_ids(position_ids)
    return args, kwargs


def mixers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == MIXER_CLASS_NAME]


def install(model: torch.nn.Module) -> None:
    """Swap every Mamba2 mixer's forward and add the seq_idx pre-hook on the backbone (idempotent)."""
    for mixer in mixers(model):
        mixer.forward = types.MethodType(mixer_forward, mixer)
    backbone = model.base_model
    if getattr(backbone, "_seq_idx_hook", None) is None:
        backbone._seq_idx_hook = backbone.register_forward_pre_hook(_add_seq_idx, with_kwargs=True)


def set_implementation(model: torch.nn.Module, implementation: str) -> None:
    """Force "kernel" or "reference" for every Mamba2 mixer ("auto": kernels when they can run)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"mamba implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    for mixer in mixers(model):
        mixer.mamba_implementation = implementation
