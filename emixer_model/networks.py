"""The four EMIXER networks (docs/DESIGN.md section 2), readable top to bottom.

    Generator G(z, y)        noise + label -> 1-channel image in [-1, 1]
    Encoder E(x)             image -> embedding
    ReportDecoder R(e, y)    embedding + label -> sentence topics + stop -> words (hierarchical)
    Discriminator D(x, t, y) image + report + label -> real/fake score; rotation head

Every layer that can see real data (E, R, D) is one Opacus computes per-sample gradients for
natively: Conv2d, Linear, GroupNorm, LayerNorm. Hence GroupNorm, never BatchNorm (it mixes
samples); tokens as one-hot/soft vectors through Linear, never nn.Embedding (dense per-sample
grads anyway, and soft Gumbel tokens must share the path); our own causal attention built from
Linear, never nn.MultiheadAttention or an LSTM. Learned positions and sentence queries are a
bias-free Linear applied to an identity matrix, so they too are plain Linear weights to Opacus.
Every tensor keeps the batch first (words as [B, S, W, ...]): Opacus assigns per-sample
gradients by the first dimension, so folding sentences into the batch would split one sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from emixer_model.config import ModelConfig, public_prior
from emixer_model.text.vocabulary import BOS, EOS, PAD

# The least share a label's probability is given (D's label prior, D's finding head for a label
# nothing has shown yet): small enough to mean "absent", large enough to be learned away from.
RAREST_SHARE = 1e-3
UNSEEN_LOGIT = math.log(RAREST_SHARE / (1 - RAREST_SHARE))


def _check_config(cfg: ModelConfig) -> None:
    r = cfg.resolution
    if r < 16 or r & (r - 1):
        raise ValueError(f"model.resolution must be a power of two >= 16, not {r}")
    if cfg.embed_dim % cfg.heads:
        raise ValueError(
            f"model.embed_dim ({cfg.embed_dim}) must be divisible by model.heads ({cfg.heads})"
        )
    if cfg.report_temperature < 0:
        raise ValueError(f"model.report_temperature must be >= 0, not {cfg.report_temperature}")
    if cfg.max_sentences < 1 or cfg.max_words < 2:
        raise ValueError("model.max_sentences must be >= 1 and model.max_words >= 2")


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= `groups` that divides `channels`."""
    return nn.GroupNorm(math.gcd(channels, groups), channels)


def _conv_stack(cfg: ModelConfig) -> tuple[nn.Sequential, int]:
    """Stride-2 conv blocks from resolution down to 4x4; returns the stack and its flat size."""
    layers: list[nn.Module] = []
    c_in, size, c_out = 1, cfg.resolution, cfg.width
    while size > 4:
        layers += [
            nn.Conv2d(c_in, c_out, 4, stride=2, padding=1),
            _norm(c_out, cfg.groups),
            nn.LeakyReLU(0.2),
        ]
        c_in, size, c_out = c_out, size // 2, min(c_out * 2, cfg.width * 8)
    return nn.Sequential(*layers, nn.Flatten()), c_in * 4 * 4


# ---------------------------------------------------------------------------------------------
# Generator


class Generator(nn.Module):
    """G(z, y): label-conditioned upsampling conv stack. Trained on generated data only."""

    def __init__(self, cfg: ModelConfig, n_labels: int) -> None:
        super().__init__()
        n_up = int(math.log2(cfg.resolution // 4))
        channels = [min(cfg.width * 2 ** (n_up - 1 - i), cfg.width * 8) for i in range(n_up)]
        channels.append(cfg.width)
        self.label = nn.Linear(n_labels, cfg.latent_dim)
        self.project = nn.Linear(2 * cfg.latent_dim, channels[0] * 16)
        self.start = nn.Sequential(_norm(channels[0], cfg.groups), nn.LeakyReLU(0.2))
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(channels[i], channels[i + 1], 3, padding=1),
                    _norm(channels[i + 1], cfg.groups),
                    nn.LeakyReLU(0.2),
                )
                for i in range(n_up)
            )
        )
        self.out = nn.Conv2d(cfg.width, 1, 3, padding=1)
        self.c0 = channels[0]

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, self.label(y)], dim=1)).view(len(z), self.c0, 4, 4)
        return torch.tanh(self.out(self.blocks(self.start(h))))


# ---------------------------------------------------------------------------------------------
# Encoder


class Encoder(nn.Module):
    """E(x): image -> embedding that the report decoder writes from."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.convs, flat = _conv_stack(cfg)
        self.fc = nn.Linear(flat, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(x))


# ---------------------------------------------------------------------------------------------
# Report decoder: causal transformer blocks (nanoGPT), a sentence stage and a word stage


KVCache = dict[str, torch.Tensor]  # one attention layer's keys "k" and values "v" so far


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention over the second-to-last axis; any leading axes.

    With `cache` (inference only) the keys and values of earlier calls are kept in it, so
    decoding feeds one new position per call instead of re-running the whole prefix.
    """

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        *lead, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=-1)
        q, k, v = (a.reshape(-1, t, self.heads, d // self.heads).transpose(1, 2) for a in (q, k, v))
        if cache is not None:
            if "k" in cache:  # a single new position may see every cached one: no mask needed
                if t != 1:
                    raise ValueError("with a filled kv-cache, feed one new position at a time")
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] == k.shape[2])
        return self.c_proj(y.transpose(1, 2).reshape(*lead, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


def _identity(n: int, like: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """An identity matrix broadcast to [*lead, n, n]: input of a learned-position Linear."""
    eye = torch.eye(n, device=like.device, dtype=like.dtype)
    return eye.expand(*lead, n, n)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of `probs` [N,V], drawn with the row's probabilities by inverse CDF.

    One uniform number per row: torch.multinomial draws one exponential per vocabulary entry
    (Gumbel-max), which cost 15x more and an eighth of a release's generation time. The CDF is
    divided by its last value, so it ends at exactly 1 > u and a zero-probability entry (its CDF
    step is empty) is never drawn.
    """
    where = generator.device if generator is not None else probs.device
    cdf = probs.to(where).cumsum(dim=-1)
    cdf = cdf / cdf[:, -1:]
    u = torch.rand(len(cdf), 1, generator=generator, device=where)
    return torch.searchsorted(cdf, u, right=True)[:, 0]


def _straight_through(soft: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Forward value `hard`, gradient of `soft`."""
    return hard + soft - soft.detach()


class ReportDecoder(nn.Module):
    """R(e, y): hierarchical report decoder (sentence topics + stop, then words per sentence).

    Conditioned on the image embedding and the label vector (known at synthesis), so a report
    states its labels; the label enters through a Linear layer, per-sample to Opacus.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, n_labels: int) -> None:
        super().__init__()
        d, self.S, self.W, self.V = cfg.embed_dim, cfg.max_sentences, cfg.max_words, vocab_size
        # sentence stage: [embedding, slot_1 .. slot_S] -> causal blocks -> topic + stop per slot;
        # the label projection is added to every slot, so each sentence can read it directly
        self.embed_in = nn.Linear(d, d)
        self.label_in = nn.Linear(n_labels, d, bias=False)
        self.slots = nn.Linear(self.S + 1, d, bias=False)  # learned slot queries (+ position)
        self.sentence_blocks = nn.Sequential(
            *(Block(d, cfg.heads) for _ in range(cfg.sentence_layers))
        )
        self.sentence_ln = nn.LayerNorm(d)
        self.topic = nn.Linear(d, d)
        self.stop = nn.Linear(d, 1)
        # word stage: one-hot/soft tokens -> Linear, + positions + topic -> causal blocks -> vocab
        self.tok = nn.Linear(vocab_size, d, bias=False)
        self.pos = nn.Linear(self.W, d, bias=False)
        self.word_blocks = nn.Sequential(*(Block(d, cfg.heads) for _ in range(cfg.word_layers)))
        self.word_ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab_size)
        # each label's own bias on the words (zero at the start): only rows showing a label move
        # its column, so a site that never shows a finding cannot unlearn that finding's words
        # through it, as it does through the shared head (bench/README.md, issue 16)
        self.label_words = nn.Linear(n_labels, vocab_size, bias=False)
        nn.init.zeros_(self.label_words.weight)

    def sentences(
        self, embedding: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Topic vectors [B,S,d] and stop logits [B,S] (logit that sentence s is absent)."""
        b = len(embedding)
        x = self.slots(_identity(self.S + 1, embedding, (b,))) + self.label_in(labels)[:, None]
        x = torch.cat([x[:, :1] + self.embed_in(embedding)[:, None], x[:, 1:]], dim=1)
        h = self.sentence_ln(self.sentence_blocks(x))[:, 1:]
        return self.topic(h), self.stop(h).squeeze(-1)

    def words(
        self, tokens: torch.Tensor, topics: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Next-word logits [B,S,T,V] from input token vectors [B,S,T,V] (T <= W)."""
        b, s, t, _ = tokens.shape
        pos = self.pos(_identity(self.W, topics, (b, s)))[:, :, :t]
        x = self.tok(tokens) + pos + topics[:, :, None]
        bias = self.label_words(labels)[:, None, None]
        return self.head(self.word_ln(self.word_blocks(x))) + bias

    def teacher_forced_loss(
        self,
        embedding: torch.Tensor,
        labels: torch.Tensor,
        tokens: torch.Tensor,
        smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Per-sample loss [B]: mean word cross-entropy over non-PAD targets + stop loss.

        `smoothing` (label smoothing of the word targets) keeps a floor under every word's
        probability, so words the training text never used stay within reach of later training.
        """
        topics, stop_logits = self.sentences(embedding, labels)
        bos = torch.full_like(tokens[..., :1], BOS)
        inputs = F.one_hot(torch.cat([bos, tokens[..., :-1]], dim=-1), self.V).to(topics.dtype)
        logits = self.words(inputs, topics, labels)
        ce = F.cross_entropy(
            logits.flatten(0, 2), tokens.flatten(), reduction="none", label_smoothing=smoothing
        )
        mask = (tokens != PAD).to(ce.dtype)
        ce = ce.view_as(mask)
        word_loss = (ce * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2)).clamp(min=1.0)
        absent = (tokens[:, :, 0] == PAD).to(stop_logits.dtype)
        stop_loss = F.binary_cross_entropy_with_logits(stop_logits, absent, reduction="none")
        return word_loss + stop_loss.mean(dim=1)

    def _decode(
        self,
        embedding: torch.Tensor,
        labels: torch.Tensor,
        pick: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Autoregressive decoding of all sentences in parallel -> token vectors [B,S,W,V].

        `pick(logits [B,S,V]) -> one-hot-like [B,S,V]`. Words after EOS and sentences from the
        first predicted stop on become PAD, multiplicatively, so gradients still flow.
        """
        topics, stop_logits = self.sentences(embedding, labels)
        b = len(embedding)
        pad = F.one_hot(torch.tensor(PAD, device=topics.device), self.V).to(topics.dtype)
        forbidden = torch.zeros(self.V, device=topics.device, dtype=topics.dtype)
        forbidden[[PAD, BOS]] = float("-inf")
        inputs = F.one_hot(torch.full((b, self.S, 1), BOS, device=topics.device), self.V)
        inputs = inputs.to(topics.dtype)
        alive = torch.ones(b, self.S, 1, device=topics.device, dtype=topics.dtype)
        out = []
        for t in range(self.W):
            token = pick(self.words(inputs, topics, labels)[:, :, -1] + forbidden)
            out.append(alive * token + (1 - alive) * pad)
            alive = alive * (1 - token[..., EOS : EOS + 1])
            if t + 1 < self.W:
                inputs = torch.cat([inputs, token[:, :, None]], dim=2)
        words = torch.stack(out, dim=2)
        p_absent = torch.sigmoid(stop_logits)
        absent = _straight_through(p_absent, (p_absent > 0.5).to(p_absent.dtype))
        present = torch.cumprod(1 - absent, dim=1)[..., None, None]
        return present * words + (1 - present) * pad

    def generate_soft(
        self,
        embedding: torch.Tensor,
        labels: torch.Tensor,
        tau: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Differentiable report [B,S,W,V]: straight-through Gumbel-softmax tokens."""

        def pick(logits: torch.Tensor) -> torch.Tensor:
            where = generator.device if generator is not None else logits.device
            u = torch.rand(logits.shape, generator=generator, device=where).to(logits.device)
            gumbel = -torch.log(-torch.log(u.clamp(1e-9, 1 - 1e-9)))
            soft = F.softmax((logits + gumbel) / tau, dim=-1)
            hard = F.one_hot(soft.argmax(dim=-1), self.V).to(soft.dtype)
            return _straight_through(soft, hard)

        return self._decode(embedding, labels, pick)

    @torch.no_grad()
    def sample_ids(
        self,
        embedding: torch.Tensor,
        labels: torch.Tensor,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Report ids [B,S,W] (PAD after EOS, all-PAD sentences after stop), no gradient.

        temperature 0 is greedy (the same ids as greedy `_decode`); above 0 each word is drawn
        from softmax(logits / temperature) with `generator`, so reports of one label set differ.
        Computed without the training-time costs: token vectors are rows of the token Linear's
        weight instead of one-hot matmuls, and each word step feeds only the newest word
        through the blocks (kv-cache).
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {temperature}")
        topics, stop_logits = self.sentences(embedding, labels)
        b, device = len(embedding), topics.device
        tok, pos = self.tok.weight.T.contiguous(), self.pos.weight.T  # [V,d], [W,d]
        forbidden = torch.zeros(self.V, device=device, dtype=topics.dtype)
        forbidden[[PAD, BOS]] = float("-inf")
        offset = forbidden + self.label_words(labels)[:, None]  # [B,1,V]: + the label word bias
        caches: list[KVCache] = [{} for _ in self.word_blocks]
        token = torch.full((b, self.S), BOS, device=device)
        alive = torch.ones(b, self.S, device=device, dtype=torch.bool)
        out = []
        for t in range(self.W):
            x = (tok[token] + pos[t] + topics)[:, :, None]  # [B,S,1,d]
            for block, cache in zip(self.word_blocks, caches, strict=True):
                x = block(x, cache)
            logits = self.head(self.word_ln(x))[:, :, 0] + offset
            if temperature > 0:
                probs = F.softmax(logits.flatten(0, 1).float() / temperature, dim=-1)
                token = _draw(probs, generator).view(b, self.S).to(device)
            else:
                token = logits.argmax(dim=-1)
            out.append(torch.where(alive, token, PAD))
            alive &= token != EOS
        words = torch.stack(out, dim=2)
        present = (torch.sigmoid(stop_logits) <= 0.5).int().cumprod(dim=1).bool()
        return torch.where(present[..., None], words, PAD)


# ---------------------------------------------------------------------------------------------
# Discriminator


class Discriminator(nn.Module):
    """D(x, t, y): joint image-report-label critic (projection) + rotation self-supervision."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, n_labels: int) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.V = vocab_size
        self.convs, flat = _conv_stack(cfg)
        self.image_fc = nn.Linear(flat, d)
        self.tok = nn.Linear(vocab_size, d, bias=False)  # ids (one-hot) and soft tokens alike
        self.text_fc = nn.Linear(d, d)
        self.joint = nn.Linear(2 * d, d)
        self.score = nn.Linear(d, 1)
        self.label = nn.Linear(n_labels, d, bias=False)  # projection term
        self.rotation = nn.Linear(d, 4)
        # auxiliary classifier (AC-GAN): which findings the image shows, trained on real labeled
        # images; G is rewarded when it recognises G's image as showing its conditioning labels
        self.classify = nn.Linear(d, n_labels)
        # the head reads the image features whitened by the PUBLIC collection's statistics
        # (`whiten_finding_head`; identity until then). Raw, every feature vector shares a
        # large common part, so each row's clipped gradient is mostly that part and the few
        # directions that tell a site-only finding apart drown in the noise (bench/README.md)
        self.register_buffer("feature_mean", torch.zeros(d))
        self.register_buffer("feature_whitening", torch.eye(d))
        # the labels' shares where D trains, as logits (a Linear of a constant input: Opacus
        # clips and noises its per-row gradient like any layer's); G is asked for labels drawn
        # from it, so at each site for the label mix that site's D has seen. Starts at the
        # fixed public prior; public pretraining sets it to the collection's own shares.
        self.prior = nn.Linear(1, n_labels, bias=False)
        self.set_prior(torch.tensor(public_prior()))

    @torch.no_grad()
    def set_prior(self, shares: torch.Tensor) -> None:
        """The prior's logits from label shares [L] (kept within [0.001, 0.999])."""
        self.prior.weight[:, 0] = torch.logit(shares.clamp(RAREST_SHARE, 1 - RAREST_SHARE))

    def prior_logits(self, b: int) -> torch.Tensor:
        """The prior's logits [b, L], once per row, so each row's loss has its own gradient."""
        return self.prior(self.prior.weight.new_ones(b, 1))

    def label_prior(self) -> torch.Tensor:
        """Each label's share [L] under the prior, without gradient: what G is asked for."""
        return torch.sigmoid(self.prior.weight[:, 0]).detach()

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.image_fc(self.convs(x)), 0.2)

    def text_features(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over non-PAD words, then over present sentences."""
        if t.dtype == torch.long:
            weight = (t != PAD).to(self.tok.weight.dtype)
            t = F.one_hot(t, self.V).to(self.tok.weight.dtype)
        else:
            weight = 1 - t[..., PAD]
        words = weight.sum(dim=2)  # [B,S]
        sentence = (self.tok(t) * weight[..., None]).sum(dim=2) / words.clamp(min=1e-6)[..., None]
        present = words.clamp(max=1.0)
        report = (sentence * present[..., None]).sum(dim=1)
        report = report / present.sum(dim=1).clamp(min=1e-6)[:, None]
        return F.leaky_relu(self.text_fc(report), 0.2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._score(self.image_features(x), t, y)

    def score_and_labels(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The real/fake score [B] and the auxiliary finding logits [B, L] from one image pass.

        Only here does the finding head run: Opacus keeps one activation per call of a layer
        and completes its per-sample gradient when every call has been backpropagated, so a
        head called in `forward` for rows whose logits are discarded would never complete.
        """
        image = self.image_features(x)
        return self._score(image, t, y), self.finding_logits(image)

    def finding_logits(self, image: torch.Tensor) -> torch.Tensor:
        """The finding head's logits [B, L] from image features, read whitened."""
        return self.classify((image - self.feature_mean) @ self.feature_whitening)

    def _score(self, image: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.joint(torch.cat([image, self.text_features(t)], 1)))
        return self.score(h).squeeze(1) + (self.label(y) * h).sum(dim=1)

    def rotation_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Which of 0/90/180/270 degrees `x` was rotated by: self-supervision on any scan."""
        return self.rotation(self.image_features(x))


# ---------------------------------------------------------------------------------------------
# The four together, their weights as arrays, and the device


class EmixerNets(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, n_labels: int) -> None:
        super().__init__()
        _check_config(cfg)
        self.g = Generator(cfg, n_labels)
        # exponential moving average of G's weights: what a release samples from (trained on
        # nothing, only averaged, so it needs no privacy of its own)
        self.g_ema = Generator(cfg, n_labels).requires_grad_(False)
        self.g_ema.load_state_dict(self.g.state_dict())
        self.e = Encoder(cfg)
        self.r = ReportDecoder(cfg, vocab_size, n_labels)
        self.d = Discriminator(cfg, vocab_size, n_labels)


def build_networks(model_cfg: ModelConfig, vocab_size: int, n_labels: int) -> EmixerNets:
    """The four networks, freshly initialised, on the CPU."""
    return EmixerNets(model_cfg, vocab_size, n_labels)


@torch.no_grad()
def silence_labels(nets: EmixerNets, columns: list[int]) -> None:
    """Zero the label columns `columns` in every label projection (G, its EMA, R's input and
    word bias, D's term) and their outputs of D's finding head.

    A label no training data has shown keeps its random initial column otherwise, so switching
    it on shifts the image and the report by chance: an effect nothing taught. Zeroed, the label
    changes nothing until data teach it (the gradient of a zero column is not zero).
    """
    for layer in (
        nets.g.label,
        nets.g_ema.label,
        nets.r.label_in,
        nets.r.label_words,
        nets.d.label,
    ):
        layer.weight[:, columns] = 0.0
    # D's finding head, one output per label: "absent" until data teach it, so sites where the
    # finding never occurs barely move it and the rows that show it teach its look
    nets.d.classify.weight[columns] = 0.0
    nets.d.classify.bias[columns] = UNSEEN_LOGIT


@torch.no_grad()
def whiten_finding_head(nets: EmixerNets, images: torch.Tensor, batch: int = 256) -> None:
    """Make D's finding head read its image features whitened by their mean and covariance on
    `images` (public data: no privacy cost), without changing a single output of it.

    With z = A (h - mean), A = covariance^(-1/2) (symmetric, a small ridge keeps it finite),
    the head's weights are refolded so that W' z + b' = W h + b on every input. What changes is
    the geometry of later training: a private step clips each row's gradient, and on raw
    features that gradient is mostly the part every image shares (bench/README.md: D's head
    learned the site-only finding to AUROC 0.63 raw, 0.70 standardized, 0.85 whitened)."""
    d = nets.d
    features = torch.cat(
        [d.image_features(images[i : i + batch]) for i in range(0, len(images), batch)]
    )
    mean = features.mean(dim=0)
    centered = features - mean
    covariance = centered.T @ centered / max(1, len(features) - 1)
    ridge = 1e-3 * covariance.diagonal().mean() + 1e-6
    values, vectors = torch.linalg.eigh(covariance + ridge * torch.eye(len(mean)))
    whitening = vectors @ torch.diag(values.rsqrt()) @ vectors.T
    raw = d.classify.weight @ d.feature_whitening.T  # the head on raw features
    bias = d.classify.bias - raw @ d.feature_mean
    d.classify.weight.copy_(raw @ vectors @ torch.diag(values.sqrt()) @ vectors.T)
    d.classify.bias.copy_(bias + raw @ mean)
    d.feature_mean.copy_(mean)
    d.feature_whitening.copy_(whitening)


def get_weights(nets: nn.Module) -> dict[str, np.ndarray]:
    """All weights as float32 arrays; keys stable whether or not Opacus wrapped a module."""
    return {
        name.replace("_module.", ""): tensor.detach().cpu().numpy().astype(np.float32)
        for name, tensor in nets.state_dict().items()
    }


def set_weights(nets: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load arrays from get_weights; refuses any missing, extra or mis-shaped key by name."""
    state = nets.state_dict()
    names = {name.replace("_module.", ""): name for name in state}
    missing = sorted(set(names) - set(weights))
    extra = sorted(set(weights) - set(names))
    if missing or extra:
        key = (missing or extra)[0]
        what = "is missing from the weights" if missing else "is not a weight of these networks"
        raise ValueError(
            f"weight {key!r} {what} ({len(missing)} missing, {len(extra)} unexpected); "
            "were the weights made with the same model config and EMIXER-FL version? A "
            "checkpoint from before a change of the networks (e.g. R's label_words) must be made "
            "again, e.g. with `emixer pretrain`"
        )
    new_state = {}
    for key, name in names.items():
        array = np.asarray(weights[key])
        if tuple(array.shape) != tuple(state[name].shape):
            raise ValueError(
                f"weight {key!r} has shape {tuple(array.shape)}, the networks expect "
                f"{tuple(state[name].shape)}; were the weights made with the same model config?"
            )
        new_state[name] = torch.from_numpy(array.copy()).to(state[name].dtype)
    nets.load_state_dict(new_state)


def pick_device(name: str) -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"unknown device {name!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available; use 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available; use 'cpu'")
    return device
