"""Every tunable of EMIXER-FL in one place: dataclasses with defaults, loaded from YAML.

The finding list, vocabulary and pixel normalisation are fixed in code (docs/PRIVACY.md
invariant 5); everything else (network sizes, privacy parameters, training schedule) is a config
value so a site or the coordinator can change it without touching code. Unknown keys are refused
by name, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from emixer_model.shared import UserError

# CheXpert-style findings, in the column order of `studies.csv` and of every label vector. The
# last, Pneumoperitoneum, is the phantom world's site-only finding: some phantom sites show it,
# no public collection does (docs/PHANTOM_WORLD.md).
FINDINGS: tuple[str, ...] = (
    "No Finding",
    "Cardiomegaly",
    "Pleural Effusion",
    "Consolidation",
    "Pneumothorax",
    "Lung Lesion",
    "Edema",
    "Support Devices",
    "Pneumoperitoneum",
)

# Which labels G is asked for before any data taught it a site's own mix: a FIXED public prior
# (roughly chest X-ray practice), never a site statistic. A finding is drawn with its
# FINDING_PROBABILITY in the studies that are not "No Finding" (NO_FINDING_PROBABILITY, or none
# drawn). D's learned prior (`Discriminator.prior`) starts from it, as marginals.
NO_FINDING_PROBABILITY = 0.3
FINDING_PROBABILITY = {
    "Cardiomegaly": 0.2,
    "Pleural Effusion": 0.25,
    "Consolidation": 0.15,
    "Pneumothorax": 0.1,
    "Lung Lesion": 0.1,
    "Edema": 0.15,
    "Support Devices": 0.3,
    "Pneumoperitoneum": 0.1,
}


def public_prior() -> list[float]:
    """The fixed prior as each label's marginal share, in FINDINGS order."""
    finding_share = 1.0 - NO_FINDING_PROBABILITY
    return [
        NO_FINDING_PROBABILITY
        if name == "No Finding"
        else finding_share * FINDING_PROBABILITY.get(name, 0.0)
        for name in FINDINGS
    ]


# Epochs of the judge (the finding classifier `emixer evaluate` and bench/utility.py train on a
# site's real judge-train studies). 3 phantom sites x 160 at 64 px, 386 judge-train / 94 held-out
# studies, load 8 on 2 cores: 60 epochs (780 steps) 11 s, held-out AUROC 0.80; 100 epochs 27 s,
# 0.85.
JUDGE_EPOCHS = 60


class ConfigError(UserError, ValueError):
    """A config file or value is wrong; the message names the key and what to do."""


@dataclass
class ModelConfig:
    """Shapes of the four EMIXER networks (docs/DESIGN.md section 2)."""

    resolution: int = 64  # image side in pixels: 64 on CPU, 128/256 on GPU
    latent_dim: int = 64  # generator noise size
    width: int = 32  # base number of conv channels in G, E and D
    embed_dim: int = 128  # image embedding size and text model width
    max_sentences: int = 6  # report length cap: sentences ...
    max_words: int = 12  # ... x words per sentence (EOS included)
    sentence_layers: int = 1  # causal attention blocks in the sentence stage
    word_layers: int = 2  # causal attention blocks in the word stage
    heads: int = 4  # attention heads in both stages
    gumbel_tau: float = 1.0  # Gumbel-softmax temperature (train.text_gradient_to_g only)
    report_temperature: float = 1.0  # sampling temperature of generated reports (D's fake
    #   rows and releases); 0 is greedy: one report per label set and image
    groups: int = 8  # GroupNorm groups (never BatchNorm: docs/DESIGN.md section 2)


@dataclass
class PrivacyConfig:
    """Sample-level DP-SGD parameters of one site (docs/PRIVACY.md)."""

    epsilon_budget: float = 10.0  # the site never trains past this epsilon
    target_epsilon: float | None = None  # epsilon to reach at the end of the horizon
    #   (None: the budget); ignored when noise_multiplier is given
    noise_multiplier: float | None = None  # given directly instead of derived from the target
    max_grad_norm: float = 1.0  # per-sample (per-patient) clipping norm
    delta: float | None = None  # None: 1 / (10 * number of sampling units)
    accountant: str = "rdp"  # "rdp" or "prv"
    secure_mode: bool = False  # Opacus' floating-point-attack-resistant noise (4 draws per value)

    def __post_init__(self) -> None:
        if self.accountant not in ("rdp", "prv"):
            raise ConfigError(f"privacy.accountant must be 'rdp' or 'prv', not {self.accountant!r}")
        if self.epsilon_budget <= 0:
            raise ConfigError("privacy.epsilon_budget must be positive")
        if self.max_grad_norm <= 0:
            raise ConfigError("privacy.max_grad_norm must be positive")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError("privacy.delta must be between 0 and 1")
        if self.noise_multiplier is not None and self.noise_multiplier <= 0:
            raise ConfigError("privacy.noise_multiplier must be positive")


DP_TRAINABLE = ("all", "top", "labels", "label-words")  # "all" and training.PRIVATE_LAYERS
UNSHOWN = "unshown"  # train.site_findings: what the public model never saw (the server fills it)
# The training keys that teach the release what only the sites' patients show while keeping what
# the public model knew, for a federation that starts from `emixer pretrain`'s model: only D's
# label layers and R's per-label word bias train privately, and of them only the findings the
# public model never saw, on SGD, D's finding head weighted twice (bench/README.md,
# "learn-unshown-lw16 on the test split"). The demo and deploy/server.yaml run it; TrainConfig's
# own defaults serve a start from random weights, which "label-words" could not learn from.
SITE_KNOWLEDGE_TRAIN: dict[str, object] = {
    "dp_trainable": "label-words",
    "site_findings": UNSHOWN,
    "label_weight": 16.0,
    "private_optimizer": "sgd",
    "lr_d": 0.1,
    "lr_text": 1.0,
    "lr_g": 5e-4,
    "g_steps": 4,
    "clip_per_network": True,
    "epochs": 20,
}


@dataclass
class TrainConfig:
    """Local training schedule of one site."""

    batch_size: int = 32  # expected rows per step (Poisson sampling: the mean, not a fixed size)
    epochs: int = 1  # local epochs per round (or in total for `emixer train-local`)
    lr_d: float = 2e-4  # discriminator (private)
    lr_text: float = 5e-4  # image encoder + report decoder (private)
    lr_g: float = 2e-4  # generator (trained on generated samples only)
    lr_prior: float = 0.5  # D's learned label prior (private, as D): the site's label mix,
    #   which G is asked for. Each round starts from the federation's average, so a site's
    #   own shares must be reached within its first steps (from 0.001: about 15 Adam steps)
    beta1: float = 0.5  # Adam betas of all three optimizers (0.5 is the usual GAN choice)
    beta2: float = 0.999
    rotation_weight: float = 1.0  # weight of the self-supervised rotation loss
    label_weight: float = 8.0  # weight of D's auxiliary finding classifier (on real labeled
    #   images) and of G's reward for images D's classifier reads as their labels; 0: off.
    #   8 measured best of 0/1/3/8 on phantoms (judge lift 0.48/0.53/0.68/0.93 after 600
    #   public steps; bench/README.md)
    uncertain_as: str = "positive"  # how a -1 (uncertain) finding is trained: positive or negative
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available, else CPU
    holdout_fraction: float = 0.0  # privacy units kept out of training for `emixer audit`
    public_warm_start_steps: int = 0  # coordinator: steps of the report decoder on the public
    #   report grammar before round 1 (no site data, no privacy cost); 0 turns it off
    d_steps: int = 1  # private D/E/R steps per generator step (each one is accounted)
    g_steps: int = 1  # generator steps after each group of d_steps private steps: G learns
    #   from generated data only, so its extra steps cost compute, never privacy
    clip_per_network: bool = False  # clip D's and E+R's per-sample gradients separately, each
    #   to half (in squares) of what D's label prior leaves of max_grad_norm (the whole row's
    #   norm, the sensitivity, stays max_grad_norm);
    #   off: one clip over D, E and R, where D's large gradient leaves R little of the norm
    report_label_smoothing: float = 0.0  # label smoothing of R's word loss (public pretraining
    #   and sites): bounds how far words no public report uses are pushed down, so a site's
    #   own words can still be learned from a pretrained model
    ema_decay: float = 0.99  # EMA of G's weights, which releases sample from; 0: EMA = G
    private_optimizer: str = "adam"  # "adam" or "sgd" (momentum sgd_momentum) for D, E, R
    sgd_momentum: float = 0.9  # heavy-ball momentum of the private SGD: under DP noise Adam
    #   scales every coordinate to a step of about lr, so noise coordinates random-walk as fast
    #   as signal ones; SGD moves each in proportion to its (noisy) mean gradient
    dp_trainable: str = "all"  # private parameters that move: "all"; "top" (norm affines,
    #   label projections and the output layers of D, E, R: less noise for a pretrained model);
    #   "labels" (only the layers tying labels to images and reports; E frozen); "label-words"
    #   (D's label layers and R's per-label word bias: what a site-only finding's reports need)
    site_findings: str = ""  # under dp_trainable "label-words": the findings (comma-separated)
    #   whose parts of the per-label parameters the sites train (R's word bias, D's projection
    #   and finding head); the others keep the starting model's, which the DP noise on their
    #   coordinates would otherwise wear away. "unshown": the findings the starting model's
    #   public pretraining never showed (the server fills them in). "": every finding, which
    #   carried the site-only finding further but cost the shared findings a third of their
    #   report fidelity (bench/README.md)
    text_gradient_to_g: bool = False  # G also learns through differentiable (Gumbel) reports;
    #   off: D scores sampled reports and G learns through the image, at a fraction of the cost

    def __post_init__(self) -> None:
        if self.uncertain_as not in ("positive", "negative"):
            raise ConfigError("train.uncertain_as must be 'positive' or 'negative'")
        if self.batch_size < 1 or self.epochs < 1:
            raise ConfigError("train.batch_size and train.epochs must be at least 1")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError("train.holdout_fraction must be in [0, 1)")
        if self.public_warm_start_steps < 0:
            raise ConfigError("train.public_warm_start_steps must be >= 0 (0 turns it off)")
        if self.d_steps < 1 or self.g_steps < 1:
            raise ConfigError("train.d_steps and train.g_steps must be at least 1")
        if not 0.0 <= self.report_label_smoothing < 1.0:
            raise ConfigError("train.report_label_smoothing must be in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("train.ema_decay must be in [0, 1)")
        if self.private_optimizer not in ("adam", "sgd"):
            raise ConfigError("train.private_optimizer must be 'adam' or 'sgd'")
        if not 0.0 <= self.sgd_momentum < 1.0:
            raise ConfigError("train.sgd_momentum must be in [0, 1)")
        if self.dp_trainable not in DP_TRAINABLE:
            raise ConfigError(f"train.dp_trainable must be one of {', '.join(DP_TRAINABLE)}")
        if self.site_findings and self.dp_trainable != "label-words":
            raise ConfigError(
                "train.site_findings applies only under train.dp_trainable: label-words; "
                f"with {self.dp_trainable!r} every finding trains, so leave it empty"
            )
        named = [] if self.site_findings == UNSHOWN else self.site_finding_list()
        unknown = [f for f in named if f not in FINDINGS]
        if unknown:
            raise ConfigError(
                f"train.site_findings: {unknown[0]!r} is not a finding; name findings from: "
                + ", ".join(FINDINGS)
                + f", or write {UNSHOWN!r}"
            )

    def site_finding_list(self) -> list[str]:
        """site_findings as a list of finding names ([]: every finding)."""
        return [f.strip() for f in self.site_findings.split(",") if f.strip()]


STRATEGIES = ("fedavg", "fedadam", "fedmedian", "fedtrimmedavg")


@dataclass
class FederationConfig:
    """How the server runs the federation (docs/DESIGN.md section 4)."""

    rounds: int = 3  # planned rounds: the privacy horizon is rounds x local steps
    strategy: str = "fedavg"  # one of STRATEGIES
    min_sites: int = 2  # fewest usable updates that change the model (fewer: round skipped)
    on_budget_exhausted: str = "continue"  # "continue" without the site, or "stop" training
    max_update_norm: float = 1000.0  # L2 norm bound of (site arrays - global arrays)
    round_timeout: float = 3600.0  # seconds to wait for the sites of one round
    server_lr: float = 0.01  # FedAdam's server learning rate
    trim_beta: float = 0.2  # FedTrimmedAvg: fraction cut at each end
    update_dtype: str = "float32"  # how sites send updates: "float16" halves the upload
    # Simulation only: Flower gives simulated nodes just `partition-id`; these map it to a site.
    site_dirs: str = ""  # comma-separated site folders, one per partition
    state_root: str = ""  # per-site state directories are created below it
    checkpoint_dir: str = ""  # where the server writes its checkpoints
    initial_model: str = ""  # a checkpoint (e.g. from `emixer pretrain`) round 1 starts from
    resume: bool = False  # continue from the newest checkpoint in checkpoint_dir

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"federation.strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}"
            )
        if self.update_dtype not in ("float32", "float16"):
            raise ConfigError("federation.update_dtype must be 'float32' or 'float16'")
        if self.on_budget_exhausted not in ("continue", "stop"):
            raise ConfigError("federation.on_budget_exhausted must be 'continue' or 'stop'")
        if self.rounds < 1 or self.min_sites < 1:
            raise ConfigError("federation.rounds and federation.min_sites must be at least 1")


@dataclass
class EmixerConfig:
    """The whole config: `model`, `privacy`, `train` and `federation` sections of a YAML file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flatten to Flower's run config ("section.key" -> scalar); None becomes "" (TOML has no
        null), which from_run_config turns back into None."""
        return {
            f"{section}.{key}": "" if value is None else value
            for section, values in self.to_dict().items()
            for key, value in values.items()
        }

    @classmethod
    def from_run_config(cls, flat: dict[str, Any]) -> EmixerConfig:
        """Inverse of to_run_config; unknown keys are refused by name."""
        nested: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            section, _, name = key.partition(".")
            if not name:
                raise ConfigError(f"run config key {key!r} must look like 'section.key'")
            nested.setdefault(section, {})[name] = value
        for section in dataclasses.fields(cls):
            values = nested.get(section.name)
            if not isinstance(values, dict):
                continue
            for option in dataclasses.fields(section.default_factory):
                if option.default is None and values.get(option.name) == "":
                    values[option.name] = None
        return from_dict(cls, nested)


T = TypeVar("T")


def config_key(meaning: str, default: Any = MISSING) -> Any:
    """A dataclass field for a key of a config file: its default (none: the key is required)
    and its meaning, which `from_dict` says when a required key is missing."""
    return field(default=default, metadata={"help": meaning})


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, strictly: unknown keys are refused by name, a field
    without a default must be given (its `metadata["help"]` says what it is), and each value must
    have the field's annotated type (ints pass as floats). Nested sections (a dataclass field with
    `default_factory`) and lists of sections (`list[Section]`) are read the same way.

    The one loader of every config file: the run config (EmixerConfig), site.yaml and server.yaml.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown key {where + unknown[0]!r}; known keys here: {known}")
    for name, spec in fields.items():
        required = spec.default is MISSING and spec.default_factory is MISSING
        if required and data.get(name) in (None, ""):
            meaning = spec.metadata.get("help")
            raise ConfigError(f"needs {where + name!r}" + (f": {meaning}" if meaning else ""))
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{where}{name}.")
        elif typing.get_origin(hint) is list:
            (item,) = typing.get_args(hint)
            if not isinstance(value, list):
                raise ConfigError(f"{where}{name} must be a list")
            kwargs[name] = [
                from_dict(item, entry, f"{where}{name}[{i}].") for i, entry in enumerate(value)
            ]
        else:
            kwargs[name] = _checked(value, hint, where + name)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"bad value in {where or 'config'}: {err}") from None


TYPE_NAMES = {bool: "true or false", float: "a number", str: "text"}


def _checked(value: Any, hint: Any, key: str) -> Any:
    """The value if it has the annotated type (`float` takes ints, returned as floats; `X | None`
    takes None); else ConfigError naming the key."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    expected = tuple(t for t in options if t is not type(None))
    if float in expected and int not in expected:
        expected += (int,)
    if isinstance(value, bool) and bool not in expected or not isinstance(value, expected):
        names = " or ".join(TYPE_NAMES.get(t, t.__name__) for t in expected if t is not int)
        raise ConfigError(f"{key} must be {names or 'an integer'}, not {value!r}")
    if float in expected and isinstance(value, int) and not isinstance(value, bool):
        return float(value) if int not in options else value
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML mapping (an empty file is an empty mapping) with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of keys to values")
    return data


def load_yaml_as(cls: type[T], path: str | Path) -> T:
    """A config file read strictly into dataclass `cls`; errors name the file and the key."""
    try:
        return from_dict(cls, read_yaml(path))
    except ConfigError as err:
        message = str(err)
        name = Path(path).name
        raise ConfigError(message if name in message else f"{name}: {message}") from None


def load_config(path: str | Path | None) -> EmixerConfig:
    """Read an EmixerConfig from YAML; None gives the defaults."""
    return EmixerConfig() if path is None else load_yaml_as(EmixerConfig, path)
