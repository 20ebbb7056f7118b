"""Synthesis: image-report pairs from the trained networks for given label vectors.

One function serves the release and the utility bench, so what researchers receive is exactly
what was measured (the audit samples the same EMA generator for its nearest-neighbour attack).
Images come from the EMA copy of the generator; reports are drawn from R conditioned on the
image's embedding and the labels at `model.report_temperature`.
"""

from __future__ import annotations

import torch

from emixer_model.config import ModelConfig
from emixer_model.networks import EmixerNets


@torch.no_grad()
def synthesize(
    nets: EmixerNets,
    model_cfg: ModelConfig,
    labels: torch.Tensor,
    generator: torch.Generator,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N,1,R,R] in [-1,1], report ids [N,S,W]) for label vectors `labels` [N,L]."""
    device = next(nets.parameters()).device
    images, ids = [], []
    for start in range(0, len(labels), batch_size):
        y = labels[start : start + batch_size].to(device)
        z = torch.randn(len(y), model_cfg.latent_dim, generator=generator).to(device)
        x = nets.g_ema(z, y)
        t = nets.r.sample_ids(nets.e(x), y, model_cfg.report_temperature, generator)
        images.append(x.cpu())
        ids.append(t.cpu())
    if not images:
        r = model_cfg.resolution
        empty_ids = torch.zeros(0, model_cfg.max_sentences, model_cfg.max_words, dtype=torch.long)
        return torch.zeros(0, 1, r, r), empty_ids
    return torch.cat(images), torch.cat(ids)
