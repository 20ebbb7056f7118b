"""Synthesis: image-report pairs from the trained networks for given label vectors.

One function serves the release (through synthesize_batches) and the utility bench, so what
researchers receive is exactly what was measured (the audit samples the same EMA generator for
its nearest-neighbour attack).
Images come from the EMA copy of the generator; reports are drawn from R conditioned on the
image's embedding and the labels at `model.report_temperature`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from emixer_model.config import ModelConfig
from emixer_model.networks import EmixerNets

GENERATION_THREADS = 2  # batches computed at once (each holds its activations in memory)


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


def synthesize_batches(
    nets: EmixerNets,
    model_cfg: ModelConfig,
    label_batches: Sequence[torch.Tensor],
    seed: int,
    threads: int = GENERATION_THREADS,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """synthesize() of each label batch, yielded in order, `threads` batches computed at once.

    The caller's torch threads are shared out between the batch threads: one each on 2 cores.
    Two OpenMP threads on 2 cores meet at a barrier after every operator, and R samples in
    hundreds of small ones: whenever anything else takes a core (the release's writer threads,
    another process) they wait for each other, and a release ran 3x slower than this way on a
    busy machine (bench/README.md). Whole batches on separate threads need no barrier between
    them; torch releases the GIL in its kernels.

    Batch i draws from its own generator, seeded by numpy's SeedSequence(seed) child i, so the
    pairs do not depend on the number of threads or on which thread ran which batch.
    """
    seeds = np.random.SeedSequence(seed).spawn(len(label_batches))
    intra_op = torch.get_num_threads()
    torch.set_num_threads(max(1, intra_op // threads))
    pool = ThreadPoolExecutor(threads, thread_name_prefix="synthesis")
    running: deque[Future[tuple[torch.Tensor, torch.Tensor]]] = deque()
    try:
        for labels, batch_seed in zip(label_batches, seeds, strict=True):
            generator = torch.Generator().manual_seed(int(batch_seed.generate_state(1)[0]))
            running.append(pool.submit(synthesize, nets, model_cfg, labels, generator, len(labels)))
            if len(running) == threads:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(intra_op)
