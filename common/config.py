"""One typed configuration for a whole run.

Every run (synthetic data generation, teacher training, distillation, a federation) is described
by a single :class:`RunConfig`. It is loaded from a YAML file in ``configs/``; keys that the file
omits take the defaults written here, and ``--set key.path=value`` overrides are applied on top.

Validation is strict (:mod:`common.typedconfig`): an unknown key, a value of the wrong type, a
value out of range or a missing file raises :class:`ConfigError` whose message names the file,
the dotted key path and what was expected, e.g.
``configs/x.yaml: distill.temperature: expected a number >= 0.01, got -1``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from common.architectures import feature_names
from common.typedconfig import ConfigError, build, field_, parse_override, set_path

CATALOGUE = "methods.yaml"   # the method catalogue, beside the grid configs


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass
class SplitConfig:
    """Fractions of each site's *cases* per split (by case, never by slice)."""

    train: float = field_(0.6, lo=0.0, hi=1.0)
    val: float = field_(0.2, lo=0.0, hi=1.0)
    test: float = field_(0.2, lo=0.0, hi=1.0)


@dataclass
class DataConfig:
    """Where the data lives and how volumes become 2D training slices."""

    root: str = field_("data/synthetic", doc="dataset root (relative paths are resolved from the CWD)")
    layout: Literal["liu", "msd", "manifest"] = field_("liu", doc="on-disk layout of the sites")
    sites: list[str] = field_(factory=list, doc="site folders to use; empty = every site found")
    proxy: Union[str, list[str]] = field_(
        "PROXY", doc="public proxy set: one folder or a list of folders (relative to root, or "
        "absolute; Liu layout), e.g. [promise12/RUNMC, public-pool]; a set may come without "
        "masks (its masks are used where present)")
    proxy_pad: Literal["zero", "edge", "reflect"] = field_(
        "zero", doc="how a proxy volume smaller than data.size is padded in-plane (a public set "
        "cropped around the gland): zero (black), edge (the border voxels repeated) or reflect "
        "(mirrored); site volumes are always zero-padded")
    proxy_slice_step: Union[int, dict[str, int]] = field_(
        1, lo=1, hi=64, doc="the server queries every k-th slice of each proxy volume "
        "(neighbouring thin slices are nearly alike); per public set by folder name, e.g. "
        "{RUNMC: 1, public-pool: 2} (a set not named: every slice)")
    manifest: Optional[str] = field_(None, doc="YAML/CSV manifest of image/label pairs (layout manifest)")
    msd_channel: int = field_(0, lo=0, doc="channel of a 4D MSD image to use (Task05: 0 = T2)")
    label_mode: Literal["auto", "binary", "positive"] = field_(
        "auto", doc="binary: labels must be 0/1; positive: label > 0 is gland; auto: msd->positive")
    spacing: list[float] = field_(factory=lambda: [1.0, 1.0], lo=0.05, hi=20.0,
                              doc="target in-plane spacing in mm (slice spacing is kept)")
    size: list[int] = field_(factory=lambda: [128, 128], lo=16, hi=1024, doc="2D crop/pad size")
    context_slices: int = field_(0, lo=0, hi=5, doc="2.5D: neighbouring slices on each side as channels")
    clip_percentiles: list[float] = field_(factory=lambda: [1.0, 99.0], lo=0.0, hi=100.0)
    split: SplitConfig = field(default_factory=SplitConfig)
    seed: int = field_(0, doc="seed of the case split")
    folds: int = field_(0, lo=0, hi=100, doc="k-fold cross-validation by case: 0 = one split by "
                    "data.split; k >= 2 = the cases (patients) of each site in k folds, fold "
                    "data.fold is the test split and the rest is split into train/val by the "
                    "ratio of data.split.train to data.split.val")
    fold: int = field_(0, lo=0, hi=99, doc="the test fold when data.folds >= 2")
    group_pattern: Optional[str] = field_(None, doc="regex whose first group is the patient id of a "
                                      "case id: a patient's cases stay in one split")


@dataclass
class SynthConfig:
    """The synthetic multi-site generator (``fedkd synth``)."""

    out: str = field_("data/synthetic", doc="output directory")
    sites: int = field_(6, lo=1, hi=64)
    cases: int = field_(20, lo=1, hi=10000, doc="cases per site")
    proxy_cases: int = field_(20, lo=0, hi=10000, doc="cases in the public proxy set")
    seed: int = field_(0)


@dataclass
class ModelSpec:
    """One segmentation network. ``features`` names the maps returned for feature distillation."""

    arch: Literal["unet", "basicunet"] = field_("unet")
    channels: list[int] = field_(factory=lambda: [16, 32, 64, 128, 256], lo=1, hi=4096)
    strides: list[int] = field_(factory=lambda: [2, 2, 2, 2], lo=1, hi=4)
    num_res_units: int = field_(2, lo=0, hi=8)
    dropout: float = field_(0.0, lo=0.0, hi=0.9)
    features: list[str] = field_(factory=lambda: ["enc2", "dec2"],
                             doc="feature maps returned with the logits (see common.models)")


def _student_spec() -> ModelSpec:
    return ModelSpec(channels=[8, 16, 32, 64], strides=[2, 2, 2], num_res_units=1)


@dataclass
class ModelConfig:
    teacher: ModelSpec = field(default_factory=ModelSpec)
    student: ModelSpec = field(default_factory=_student_spec)
    site_teachers: dict[str, ModelSpec] = field_(
        factory=dict, doc="per-site teacher architecture overrides, keyed by site name")
    max_student_fraction: float = field_(0.05, lo=0.0, hi=1.0,
                                     doc="student params must be <= this fraction of the teacher's")


@dataclass
class TrainConfig:
    """Local teacher training at a site."""

    epochs: int = field_(40, lo=1, hi=10000)
    lr: float = field_(5e-3, lo=1e-7, hi=1.0)
    weight_decay: float = field_(1e-5, lo=0.0, hi=1.0)
    batch_size: int = field_(8, lo=1, hi=4096)
    patience: int = field_(10, lo=1, hi=10000, doc="early stopping: epochs without val Dice gain")
    augment: bool = field_(True, doc="random flips, 90-degree rotations, intensity scale/shift")
    intensity_augment: Literal["standard", "strong", "scanner"] = field_(
        "standard", doc="strong: + contrast inversion, histogram shift, bias field, wide gamma, "
        "blur, noise (teachers that transfer to other scanners); scanner: physical changes "
        "only (bias field, coil hot spot, wide gamma, blur, noise; common.augment)")
    empty_slice_fraction: float = field_(0.3, lo=0.0, hi=1.0,
                                     doc="fraction of gland-free train slices kept per epoch")
    max_steps_per_epoch: int = field_(0, lo=0, doc="0 = no cap (a cap keeps CPU runs short)")
    public_init_epochs: int = field_(0, lo=0, hi=1000, doc="> 0: the teacher starts from this "
                                     "many epochs of training on the masks of the site's copy "
                                     "of the public sets (public data: no privacy cost; the "
                                     "start DP-SGD needs); 0: from random weights")

    def fingerprint(self) -> dict:
        """The settings as a dict for checkpoint keys; keys added later are left out at their
        default, so checkpoints made before they existed stay reusable."""
        out = dataclasses.asdict(self)
        if out["intensity_augment"] == "standard":
            del out["intensity_augment"]
        if not out["public_init_epochs"]:
            del out["public_init_epochs"]
        return out


@dataclass
class StudentConfig:
    """How the student network is trained, whatever the method: distillation on the proxy set,
    FedAvg / FedProx local epochs at the sites, and the pooled ``central-student`` baseline. One
    recipe for all, so that no method gets less care than another. The number of passes is the
    method's own (``distill.epochs``; ``federation.rounds`` x ``federation.local_epochs``;
    ``train.epochs``); every run reports its optimizer steps."""

    lr: float = field_(5e-3, lo=1e-7, hi=1.0, doc="peak learning rate (cosine decay over the "
                   "distillation epochs / the FedAvg rounds / the epochs)")
    weight_decay: float = field_(1e-5, lo=0.0, hi=1.0)
    batch_size: int = field_(8, lo=1, hi=4096)
    augment: bool = field_(True, doc="flips, small rotation/zoom, intensity jitter (the standard "
                       "teacher recipe, common.augment); in distillation the targets and "
                       "feature maps move with the image")
    empty_slice_fraction: float = field_(0.3, lo=0.0, hi=1.0, doc="fraction of gland-free slices "
                                     "kept per epoch (distillation: slices whose target has no "
                                     "gland)")
    intensity_augment: Literal["standard", "scanner"] = field_(
        "scanner", doc="scanner: + bias field, coil hot spot, wide gamma, blur, noise "
        "(common.augment.SCANNER), for every student method alike; standard: jitter only")
    proxy_pretrain_epochs: int = field_(0, lo=0, hi=10000, doc="> 0: the server first trains "
                                        "the student on the public proxy set's own masks for "
                                        "this many epochs (this recipe); that student is where "
                                        "distillation and the FedAvg / FedProx rounds start "
                                        "(needs a proxy set with masks)")


@dataclass
class DistillConfig:
    """Server-side distillation of the student on the proxy set (its optimiser recipe is the
    ``student`` section)."""

    epochs: int = field_(20, lo=1, hi=10000)
    temperature: float = field_(2.0, lo=0.01, hi=100.0)
    w_kl: float = field_(1.0, lo=0.0)
    w_lovasz: float = field_(0.5, lo=0.0)
    w_dice: float = field_(0.5, lo=0.0)
    w_feature: float = field_(0.1, lo=0.0)
    feature_loss: Literal["mse", "attention"] = field_(
        "attention", doc="attention: distance of channel-pooled attention maps (the target of "
        "reply.features pooled); mse: 1x1 adapters to the full maps (reply.features full)")
    soft_dice: bool = field_(True, doc="Dice against the soft target probabilities (else "
                             "against their argmax)")
    kl_foreground_weight: float = field_(2.0, lo=0.0, doc="foreground-aware KL: a pixel's KL "
                                         "counts 1 + this x its target gland probability")
    lovasz_confidence: float = field_(0.7, lo=0.5, hi=1.0, doc="Lovasz on the argmax of the "
                                      "targets where their top probability reaches this (0.5: "
                                      "every pixel)")
    select_every: int = field_(0, lo=0, hi=10000, doc="keep the student every this many "
                               "epochs (and the starting weights of a refinement, e.g. feddf's "
                               "FedAvg student); the sites' validation Dice picks the final one "
                               "(0: the last epoch, no selection)")
    proxy_label_weight: float = field_(0.0, lo=0.0, hi=1.0, doc="share of the public proxy "
                                       "set's own masks in the targets: (1 - w) x teachers + w x "
                                       "one-hot mask (needs a proxy set with masks)")
    max_claim_distance: Optional[float] = field_(None, lo=0.0, doc="aggregation affinity: leave "
                                                 "out proxy slices whose nearest site distance "
                                                 "exceeds this (None: keep all)")
    steps_per_epoch: int = field_(0, lo=0, hi=1000000, doc="the budget in optimiser steps: > 0: "
                                  "every epoch is this many steps of student.batch_size slices "
                                  "drawn at random (gland slices, and empty ones at "
                                  "student.empty_slice_fraction the odds), whatever the proxy "
                                  "set's size; 0: one pass over the epoch's slices")
    set_weights: dict[str, float] = field_(
        factory=dict, lo=0.0, doc="with steps_per_epoch: each public set's share of the drawn "
        "slices, by folder name (e.g. {RUNMC: 0.5, public-pool: 0.5}; the key '*' gives every "
        "set not named that share); empty: every slice equally likely, so a set's share is its "
        "share of the slices")
    style_augment: float = field_(0.0, lo=0.0, hi=1.0, doc="share of the drawn proxy slices "
                                  "restyled into a random site's look (its shared style, "
                                  "reply.share_style; strength uniform in [0, 1]) before the "
                                  "student sees them (0: off)")


# federation.strategy values that are pooled-data baselines: they run only in simulation, and no
# site step (adaptation) follows them
SIMULATION_ONLY = ("local", "central", "central-student", "central-kd")


@dataclass
class AdaptConfig:
    """Site adaptation (message ``train.adapt``): after the federation, every site fine-tunes the
    final student on its private train split and keeps the result; only metrics come back. The
    optimiser recipe is the ``student`` section's (batch size, augmentation, empty slices)."""

    enabled: bool = field_(False, doc="send train.adapt after the final evaluation")
    epochs: int = field_(30, lo=1, hi=10000)
    lr: float = field_(3e-3, lo=1e-7, hi=1.0, doc="peak learning rate of the fine-tuning (cosine)")
    patience: int = field_(10, lo=1, hi=10000, doc="early stopping: epochs without val Dice gain")
    w_teacher: float = field_(1.0, lo=0.0, doc="KL to the site's own teacher on its private "
                              "images (the teacher is trained first if the site has none)")
    w_proxy: float = field_(0.5, lo=0.0, doc="KL to the received student on public proxy "
                            "slices: the federation's knowledge is not forgotten")
    temperature: float = field_(2.0, lo=0.01, hi=100.0, doc="of both KL terms")
    proxy_batch_size: int = field_(8, lo=1, hi=4096, doc="proxy slices per step")


@dataclass
class ConsensusConfig:
    """Consensus rounds (message ``train.consensus``, federation.strategy kd): after the first
    proxy query the server sends the aggregated targets on the public proxy slices back to the
    sites; each fine-tunes a copy of its teacher on its private labels plus that consensus and
    answers the query again. The student is distilled from the last answer. A site's teacher
    checkpoint is not changed (the refined copy is kept beside it, STATE_DIR/consensus)."""

    rounds: int = field_(0, lo=0, hi=10, doc="consensus rounds after the first query (0 = off)")
    epochs: int = field_(5, lo=1, hi=1000, doc="fine-tuning epochs of a teacher per round (the "
                         "site's validation Dice picks among them)")
    lr: float = field_(1e-3, lo=1e-7, hi=1.0, doc="peak learning rate of the fine-tuning (cosine)")
    weight: float = field_(1.0, lo=0.0, doc="KL to the consensus on the proxy slices, beside "
                           "the teacher's own Dice + CE on its private labels")
    proxy_batch_size: int = field_(8, lo=1, hi=4096, doc="proxy slices per step")


AUTO_CANDIDATES = ("affinity", "adaptive", "mean", "era")   # what aggregation.method auto tries


@dataclass
class AggregationConfig:
    method: Literal["affinity", "adaptive", "mean", "era", "single", "auto"] = field_(
        "auto", doc="auto (default): the server aggregates the same replies with each of "
        "auto_candidates and keeps the targets that agree best (Dice) with the public proxy "
        "set's own masks (no site data is read); a proxy set without masks: the first candidate")
    auto_candidates: list[str] = field_(factory=lambda: ["affinity", "mean", "adaptive", "era"],
                                        doc="auto: the methods tried (of AUTO_CANDIDATES); the "
                                        "first is used when the proxy set has no masks")
    confidence_temperature: float = field_(1.0, lo=0.01, hi=100.0)
    era_temperature: float = field_(0.5, lo=0.01, hi=1.0, doc="era: p^(1/T) renormalised")
    affinity_temperature: float = field_(0.1, lo=0.01, hi=100.0, doc="affinity: per-slice "
                                         "weight exp(-d / T) of each site's distance d")
    affinity_margin: float = field_(1.2, lo=0.0, hi=100.0, doc="affinity: distances up to this "
                                    "count as 0 (weight exp(-max(d - margin, 0) / T)): every "
                                    "site that claims a slice weighs equally on it (1.2: the "
                                    "proxy coverage's threshold)")
    use_agreement: bool = field_(False, doc="adaptive: multiply reliability by agreement with ensemble")
    single_site: Optional[str] = field_(None, doc="site whose teacher 'single' uses; None = best val Dice")

    def uses(self, method: str) -> bool:
        """Whether the targets may come from ``method`` (itself, or one of auto's candidates)."""
        return self.method == method or (self.method == "auto" and method in self.auto_candidates)


@dataclass
class FederationConfig:
    min_sites: int = field_(2, lo=1)
    rounds: int = field_(1, lo=1, hi=1000)
    requery_teachers: bool = field_(False)
    wait_timeout_s: float = field_(120.0, lo=0.0)
    precision: Literal["float32", "float16", "int8"] = field_("float16")
    strategy: Literal["kd", "fedavg", "fedprox", "feddf", "local", "central",
                      "central-student", "central-kd"] = field_(
        "kd", doc="kd: federated distillation; fedavg / fedprox: Flower's strategies on the "
        "student architecture; feddf: FedAvg, then the FedAvg student refined by distillation "
        "on the proxy set (Lin et al. 2020; student weights leave the sites); local, central, "
        "central-student, central-kd: baselines on pooled data, simulation only")
    local_epochs: int = field_(1, lo=1, hi=1000, doc="fedavg / fedprox: site epochs per round")
    proximal_mu: float = field_(0.01, lo=0.0, doc="fedprox: weight of the proximal term")
    self_train: bool = field_(False, doc="after the method's last round the server labels the "
                              "public proxy set with the final student and distils it on its "
                              "own soft labels (one round more; the distill recipe and budget; "
                              "no site data, no traffic): FedAvg + self-training is what a "
                              "FedAvg user can do with the same unlabelled data")
    select_round: bool = field_(False, doc="fedavg / fedprox / feddf's FedAvg stage: keep the "
                                "round whose global model scored the best sites' validation Dice "
                                "in the per-round evaluation (ties: the later round) instead of "
                                "the last; the counterpart of distill.select_every")


@dataclass
class OutputConfig:
    run_dir: str = field_("runs/default")
    state_root: str = field_("runs/state", doc="simulation: where simulated sites keep teacher "
                         "checkpoints (shared by runs, so equal teachers are trained once)")
    audit: bool = field_(False, doc="record every message (sizes, array names, shapes, dtypes) in "
                     "RUN_DIR/audit.jsonl")
    export: bool = field_(True, doc="write RUN_DIR/export (torch.export program, ONNX, model "
                          "card) at the end; fedkd experiment turns it off for its runs, whose "
                          "comparison needs only the weights (student_rN.pt)")


@dataclass
class ExperimentConfig:
    """``fedkd experiment``: methods (name -> ``key.path=value`` overrides of this config) x
    seeds, each run in the Simulation Engine on the same data and splits. In a config file, an
    item without ``=`` names an entry of the method catalogue (``experiment.catalogue``), which
    stands for that entry's overrides (:func:`expand_methods`)."""

    methods: dict[str, list[str]] = field_(factory=lambda: {"kd": []})
    catalogue: str = field_(CATALOGUE, doc="the method catalogue the grid's rows name, relative "
                            "to the config file's folder (configs/methods.yaml)")
    seeds: list[int] = field_(factory=lambda: [0])
    folds: int = field_(0, lo=0, hi=100, doc="k >= 2: every method and seed runs k times, once per "
                    "test fold (data.folds = k, data.fold = 0..k-1), so every case is tested "
                    "once; 0 = one split per seed (data.split)")
    baseline: str = field_("fedavg", doc="method the report's paired differences are taken "
                       "against (same seed and fold)")
    student_lrs: list[float] = field_(factory=list, lo=1e-7, hi=1.0, doc="learning-rate search: "
                                  "every method that trains a student runs once per value of "
                                  "student.lr, and the report keeps, per seed and fold, the run "
                                  "with the best validation Dice; empty = student.lr only")
    unseen_sites: list[str] = field_(factory=list, doc="sites (folders of data.root) outside the "
                                 "federation; every run's final model is also tested on all "
                                 "their cases")


@dataclass
class ReplyConfig:
    """How a site answers a proxy query: what it adds from its private data (calibration, the
    affinity of common.affinity) and how the teacher outputs are encoded (common.codec)."""

    affinity_k: int = field_(5, lo=1, hi=1000, doc="aggregation affinity: neighbours of the "
                             "per-slice distance a site sends (4 bytes a slice; not sent under "
                             "privacy noise)")
    calibrate: bool = field_(True, doc="temperature-scale the logits on the site's validation "
                             "split before sending")
    output: Literal["logits", "foreground"] = field_(
        "foreground", doc="logits: (N, 2, H, W) in federation.precision; foreground: one gland "
        "probability channel, quantised to reply.bits and entropy-coded (common.codec)")
    bits: int = field_(4, lo=1, hi=8, doc="foreground / pooled maps: bits per value (1, 2, 4 "
                       "or 8; error <= 1 / (2 (2^bits - 1)) of the map's range)")
    codec: Literal["zlib", "lzma", "none"] = field_("zlib", doc="entropy coding of the "
                                                   "quantised maps (standard library)")
    downsample: int = field_(1, lo=1, hi=16, doc="foreground: average-pool the probability map "
                             "by this factor; the server upsamples it bilinearly")
    features: Literal["full", "pooled"] = field_(
        "pooled", doc="full: every channel in federation.precision; pooled: the channel RMS map "
        "sqrt(mean_c f^2) (N, 1, h, w), quantised and coded like the foreground (the "
        "attention-transfer target: distill.feature_loss attention)")
    own_style: float = field_(0.0, lo=0.0, hi=1.0, doc="site-styled queries: the site moves "
                              "each proxy slice's low-frequency amplitude this far toward its own "
                              "training slices' (common.style; 1: replaced) before its teacher "
                              "answers; nothing more leaves the site (0: off)")
    share_style: bool = field_(False, doc="the site sends its style with the proxy reply: the "
                               "mean low-frequency amplitude of its training slices, one "
                               "(2b+1, 2b+1) float32 array (common.style; not an image), for "
                               "distill.style_augment")
    style_beta: float = field_(0.1, lo=0.01, hi=0.5, doc="the style window's half-width b as a "
                               "share of the slice size (0.1: 13 x 13 for 64 x 64 slices)")


@dataclass
class PrivacyConfig:
    """Gaussian mechanism on the proxy replies of every site (see :mod:`common.privacy`)."""

    noise_multiplier: float = field_(0.0, lo=0.0, doc="noise std / clip_norm; 0 = no noise")
    clip_norm: float = field_(50.0, lo=1e-6, doc="per-slice L2 bound of the released "
                          "prediction (logits, or the foreground probability map)")
    feature_clip_norm: float = field_(50.0, lo=1e-6, doc="per-slice L2 bound of the released "
                                  "feature maps (all requested maps of a slice together)")
    delta: float = field_(1e-5, lo=1e-12, hi=0.1, doc="delta of the reported (epsilon, delta)")
    dp_sgd_epsilon: float = field_(0.0, lo=0.0, hi=1000.0, doc="> 0: every model a site trains "
                                   "on its private cases (a kd teacher; fedavg's local rounds) "
                                   "is trained with DP-SGD (common.dp, Opacus) spending this "
                                   "epsilon at privacy.delta over the whole run, per training "
                                   "slice; 0: off")
    dp_sgd_max_grad_norm: float = field_(1.0, lo=1e-6, doc="DP-SGD: each slice's gradient "
                                         "clipped to this L2 norm")
    dp_sgd_batch_size: int = field_(16, lo=1, hi=4096, doc="DP-SGD: the expected batch (Poisson "
                                    "sampling at rate 1 / ceil(training slices / batch))")
    dp_sgd_lr: float = field_(5e-4, lo=1e-7, hi=1.0, doc="DP-SGD: peak learning rate (AdamW) of "
                              "a DP teacher, and of FedAvg's local rounds (cosine over the rounds) "
                              "under DP; chosen on fold 0's validation cases of federation A")


@dataclass
class CapacityConfig:
    """Adaptive student capacity (server, see :mod:`server.capacity`): distil a family of
    students from the same aggregated targets, smallest first, and keep the smallest that meets
    the Dice target (on the sites' validation splits) within the CPU latency budget."""

    enabled: bool = field_(False)
    widths: list[float] = field_(factory=lambda: [0.25, 0.5, 1.0, 2.0], lo=0.05, hi=16.0,
                             doc="candidates: channel multipliers of model.student")
    deeper: bool = field_(True, doc="also a candidate with one more level than model.student")
    dice_target: float = field_(0.0, lo=0.0, hi=1.0, doc="absolute target; 0 = none")
    relative_target: float = field_(0.0, lo=0.0, hi=1.0, doc="fraction of the teachers' mean "
                                "validation Dice; 0 = none (the larger target applies)")
    max_slice_ms: float = field_(0.0, lo=0.0, doc="CPU latency budget per slice; 0 = none")
    max_volume_ms: float = field_(0.0, lo=0.0, doc="CPU latency budget per volume; 0 = none")
    volume_slices: int = field_(24, lo=1, hi=1000, doc="slices of the timed volume")
    map_all: bool = field_(False, doc="distil every candidate instead of stopping at the first fit")


@dataclass
class BenchConfig:
    """``fedkd bench NAME`` settings (see :mod:`simulations.bench`)."""

    rounds: int = field_(10, lo=1, hi=1000, doc="comm: FedAvg rounds (KD needs one query)")
    image_size: list[int] = field_(factory=lambda: [128, 128], lo=16, hi=1024, doc="compress and scale: slice size "
                               "of the timed networks and of the simulated replies")
    volume_slices: int = field_(24, lo=1, hi=1000, doc="compress: slices of the timed volume")
    repeats: int = field_(10, lo=1, hi=1000, doc="compress: timed repetitions (median)")
    scale_sites: list[int] = field_(factory=lambda: [6, 24, 96], doc="scale: site counts for "
                                "server aggregation")
    proxy_slices: int = field_(477, lo=1, hi=100000, doc="scale: proxy slices per simulated reply")
    engine_sites: list[int] = field_(factory=lambda: [2, 6, 12], doc="scale: site counts for the "
                                 "Simulation Engine wall time")


@dataclass
class RuntimeConfig:
    threads: int = field_(2, lo=1, hi=256, doc="torch intra-op threads wherever torch runs: the "
                      "server (ServerApp, fedkd simulate), the pooled baselines, the CLI, and "
                      "a site unless runtime.client_threads or its node config says otherwise")
    client_threads: int = field_(0, lo=0, hi=256, doc="torch threads of a site node; 0 = threads "
                             "(a simulation of parallel sites should use cores / parallel sites)")
    seed: int = field_(0)


@dataclass
class RunConfig:
    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    consensus: ConsensusConfig = field(default_factory=ConsensusConfig)
    reply: ReplyConfig = field(default_factory=ReplyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def student_train(self, base: Optional[TrainConfig] = None, **changes: Any) -> TrainConfig:
        """``base`` (default ``train``) with the ``student`` recipe (lr, weight decay, batch,
        standard augmentation, empty-slice policy) and ``changes``: how a student is trained
        on labelled slices (FedAvg / FedProx local epochs, central-student)."""
        s = self.student
        return dataclasses.replace(base or self.train, lr=s.lr, weight_decay=s.weight_decay,
                                   batch_size=s.batch_size, augment=s.augment,
                                   intensity_augment=s.intensity_augment,
                                   empty_slice_fraction=s.empty_slice_fraction, **changes)

    def teacher_spec(self, site: str) -> ModelSpec:
        """The teacher architecture of ``site`` (its override, else the default teacher)."""
        return self.model.site_teachers.get(site, self.model.teacher)


def _check_consistency(cfg: RunConfig) -> None:
    """Cross-field rules that a single field's type and range cannot express."""
    s = cfg.data.split
    if abs(s.train + s.val + s.test - 1.0) > 1e-6:
        raise ConfigError(f"data.split: train + val + test must be 1, got "
                          f"{s.train} + {s.val} + {s.test}")
    if s.train <= 0:
        raise ConfigError("data.split.train: expected a value > 0")
    d = cfg.data
    if d.folds == 1:
        raise ConfigError("data.folds: expected 0 (no cross-validation) or >= 2, got 1")
    if d.folds and d.fold >= d.folds:
        raise ConfigError(f"data.fold: expected a value < data.folds ({d.folds}), got {d.fold}")
    if cfg.experiment.folds == 1:
        raise ConfigError("experiment.folds: expected 0 (no cross-validation) or >= 2, got 1")
    for key, n in (("data.spacing", len(cfg.data.spacing)), ("data.size", len(cfg.data.size)),
                   ("data.clip_percentiles", len(cfg.data.clip_percentiles)),
                   ("bench.image_size", len(cfg.bench.image_size))):
        if n != 2:
            raise ConfigError(f"{key}: expected a list of 2 values, got {n}")
    lo, hi = cfg.data.clip_percentiles
    if lo >= hi:
        raise ConfigError(f"data.clip_percentiles: lower ({lo}) must be below upper ({hi})")
    if cfg.data.layout == "manifest" and not cfg.data.manifest:
        raise ConfigError("data.manifest: required when data.layout is 'manifest'")
    if not cfg.experiment.methods or not cfg.experiment.seeds:
        raise ConfigError("experiment: needs at least one method and one seed")
    for name, items in cfg.experiment.methods.items():
        for item in items:
            key = parse_override(item)[0] if "=" in item else item
            if "=" not in item or key.split(".")[0] in ("experiment", "output"):
                raise ConfigError(f"experiment.methods.{name}: {item!r} is not a key.path=value "
                                  f"override of the run (experiment.* and output.* are set by "
                                  f"the runner)")
    agg = cfg.aggregation
    if not agg.auto_candidates or any(m not in AUTO_CANDIDATES for m in agg.auto_candidates):
        raise ConfigError(f"aggregation.auto_candidates: expected a non-empty list of "
                          f"{', '.join(AUTO_CANDIDATES)}; got {agg.auto_candidates!r}")
    if cfg.aggregation.use_agreement and not cfg.aggregation.uses("adaptive"):
        raise ConfigError(f"aggregation.use_agreement: applies to aggregation.method 'adaptive' "
                          f"(or auto with adaptive among its candidates), not "
                          f"{cfg.aggregation.method!r}")
    r = cfg.reply
    if r.bits not in (1, 2, 4, 8):
        raise ConfigError(f"reply.bits: expected 1, 2, 4 or 8, got {r.bits}")
    if r.downsample > 1 and r.output != "foreground":
        raise ConfigError("reply.downsample: applies to reply.output 'foreground', not 'logits'")
    if r.downsample > 1 and any(v % r.downsample for v in cfg.data.size):
        raise ConfigError(f"reply.downsample: {r.downsample} does not divide data.size "
                          f"{list(cfg.data.size)}")
    if cfg.capacity.enabled and (cfg.federation.strategy != "kd" or cfg.federation.rounds != 1):
        raise ConfigError("capacity.enabled: needs federation.strategy 'kd' and "
                          "federation.rounds 1 (the family is distilled from one set of targets)")
    if cfg.consensus.rounds and (cfg.federation.strategy != "kd" or cfg.federation.rounds != 1):
        raise ConfigError("consensus.rounds: needs federation.strategy 'kd' and federation.rounds "
                          "1 (the consensus refines the teachers before the one distillation)")
    if cfg.federation.select_round and cfg.federation.strategy not in ("fedavg", "fedprox",
                                                                        "feddf"):
        raise ConfigError(f"federation.select_round: applies to the FedAvg rounds of fedavg, "
                          f"fedprox and feddf, not federation.strategy "
                          f"{cfg.federation.strategy!r} (a distillation selects with "
                          f"distill.select_every)")
    if cfg.federation.self_train and (cfg.federation.strategy in SIMULATION_ONLY
                                      or cfg.capacity.enabled):
        raise ConfigError(f"federation.self_train: follows a federation's rounds, not "
                          f"federation.strategy {cfg.federation.strategy!r}"
                          + (" with capacity.enabled" if cfg.capacity.enabled else ""))
    _check_dp_sgd(cfg)
    if cfg.adapt.enabled and cfg.federation.strategy in SIMULATION_ONLY:
        raise ConfigError(f"adapt.enabled: site adaptation follows a federation, not the pooled "
                          f"baseline federation.strategy {cfg.federation.strategy!r}")
    unseen = cfg.experiment.unseen_sites
    if unseen and not cfg.data.sites:
        raise ConfigError("experiment.unseen_sites: data.sites must list the federation's sites "
                          "(the unseen ones stay out of it)")
    both = [s for s in unseen if s in cfg.data.sites]
    if both:
        raise ConfigError(f"experiment.unseen_sites: {both[0]!r} is also in data.sites")
    _check_proxy_sets(cfg)
    d = cfg.distill
    if d.set_weights:
        names = [p.name for p in proxy_set_paths(cfg.data)]
        unknown = [k for k in d.set_weights if k not in names]
        if unknown:
            raise ConfigError(f"distill.set_weights.{unknown[0]}: not a set of data.proxy "
                              f"(sets: {', '.join(names)})")
        if not d.steps_per_epoch:
            raise ConfigError("distill.set_weights: needs distill.steps_per_epoch > 0 (the "
                              "shares apply to the slices drawn for each step)")
        if sum(d.set_weights.values()) <= 0:
            raise ConfigError("distill.set_weights: at least one share must be > 0")
    if d.style_augment > 0 and not cfg.reply.share_style:
        raise ConfigError("distill.style_augment: needs reply.share_style: true (the sites' "
                          "styles to restyle the proxy slices with)")
    if (d.style_augment > 0 or cfg.reply.share_style) and \
            cfg.federation.strategy not in ("kd", "feddf"):
        raise ConfigError(f"distill.style_augment / reply.share_style: the sites share their "
                          f"style in the proxy query, which federation.strategy "
                          f"{cfg.federation.strategy!r} does not send")
    specs = [("model.teacher", cfg.model.teacher), ("model.student", cfg.model.student)]
    specs += [(f"model.site_teachers.{k}", v) for k, v in cfg.model.site_teachers.items()]
    for key, spec in specs:
        check_model_spec(spec, key)


def _check_dp_sgd(cfg: RunConfig) -> None:
    """DP-SGD (privacy.dp_sgd_epsilon) covers a kd site's teacher or a fedavg site's local
    rounds; every setting that would train on private data outside it, or send a statistic
    the guarantee does not cover, is refused."""
    p, strategy = cfg.privacy, cfg.federation.strategy
    if p.dp_sgd_epsilon <= 0:
        return
    if strategy not in ("kd", "fedavg"):
        raise ConfigError(f"privacy.dp_sgd_epsilon: DP-SGD covers federation.strategy kd (the "
                          f"teachers) or fedavg (the local rounds), not {strategy!r}")
    if p.noise_multiplier > 0:
        raise ConfigError("privacy.dp_sgd_epsilon: with privacy.noise_multiplier too; choose "
                          "one mechanism (DP-SGD training, or noise on the replies)")
    kd = strategy == "kd"
    refused = [("reply.calibrate", kd and cfg.reply.calibrate, "fits a temperature on the "
                "site's validation split"),
               ("consensus.rounds", kd and cfg.consensus.rounds, "refines the teacher without "
                "DP-SGD"),
               ("adapt.enabled", cfg.adapt.enabled, "fine-tunes on private cases without DP-SGD"),
               ("capacity.enabled", kd and cfg.capacity.enabled, "needs the teachers' "
                "validation Dice"),
               ("federation.select_round", cfg.federation.select_round, "needs the sites' "
                "per-round validation Dice"),
               ("aggregation.method: single", kd and cfg.aggregation.method == "single" and
                not cfg.aggregation.single_site, "picks by validation Dice")]
    for key, on, why in refused:
        if on:
            raise ConfigError(f"privacy.dp_sgd_epsilon: {key} {why}, outside the DP-SGD "
                              f"guarantee; turn it off")


def proxy_set_paths(data: DataConfig) -> list[Path]:
    """The public proxy set's folders (``data.proxy``: one or a list), relative to
    ``data.root`` unless absolute."""
    names = [data.proxy] if isinstance(data.proxy, str) else list(data.proxy)
    return [Path(p) if Path(p).is_absolute() else Path(data.root) / p for p in names]


def _check_proxy_sets(cfg: RunConfig) -> None:
    """The public sets: at least one, distinct names (a set's name prefixes its slice ids), and
    none that is also a site or an unseen site (its private cases would be public)."""
    paths = proxy_set_paths(cfg.data)
    if not paths:
        raise ConfigError("data.proxy: expected a folder or a non-empty list of folders")
    names = [p.name for p in paths]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"data.proxy: two public sets named {twice[0]!r} (the folder name "
                          f"names a set's slices)")
    step = cfg.data.proxy_slice_step
    unknown = [k for k in step if k not in names] if isinstance(step, dict) else []
    if unknown:
        raise ConfigError(f"data.proxy_slice_step.{unknown[0]}: not a set of data.proxy "
                          f"(sets: {', '.join(names)})")
    root = Path(cfg.data.root)
    private = [("data.sites", s) for s in cfg.data.sites]
    private += [("experiment.unseen_sites", s) for s in cfg.experiment.unseen_sites]
    for key, site in private:
        site_path = (root / site).resolve()
        for path in paths:
            proxy = path.resolve()
            if proxy == site_path or proxy in site_path.parents or site_path in proxy.parents:
                raise ConfigError(f"data.proxy: {path} overlaps {key} entry {site!r}: a site's "
                                  f"private cases cannot be a public proxy set")


def check_model_spec(spec: ModelSpec, key: str) -> None:
    """Raise ConfigError if ``spec`` cannot be built (``key`` names it in the message)."""
    if spec.arch == "unet":
        if len(spec.channels) < 2:
            raise ConfigError(f"{key}.channels: a UNet needs at least 2 levels")
        if len(spec.strides) != len(spec.channels) - 1:
            raise ConfigError(f"{key}.strides: expected {len(spec.channels) - 1} values "
                              f"(one per level below the top), got {len(spec.strides)}")
    elif spec.arch == "basicunet" and len(spec.channels) != 6:
        raise ConfigError(f"{key}.channels: basicunet takes exactly 6 values, "
                          f"got {len(spec.channels)}")
    valid = feature_names(spec)
    for name in spec.features:
        if name not in valid:
            raise ConfigError(f"{key}.features: unknown feature map {name!r} for this "
                              f"architecture (valid: {', '.join(valid)})")


def from_dict(data: dict[str, Any] | None, source: str = "<dict>") -> RunConfig:
    """Build and validate a RunConfig from plain data; errors are prefixed with ``source``."""
    try:
        cfg = build(RunConfig, data or {}, "", {})
        _resolve_set_weights(cfg)
        _check_consistency(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def _resolve_set_weights(cfg: RunConfig) -> None:
    """``distill.set_weights`` with its ``'*'`` share given to every public set not named, so
    that a run's config (and digest) names each set's share."""
    w = cfg.distill.set_weights
    if "*" in w:
        rest = w["*"]
        names = [p.name for p in proxy_set_paths(cfg.data)]
        cfg.distill.set_weights = {**{n: rest for n in names if n not in w},
                                   **{k: v for k, v in w.items() if k != "*"}}


def to_plain(cfg: RunConfig) -> dict[str, Any]:
    """A RunConfig as plain data (round-trips through :func:`from_dict`)."""
    return copy.deepcopy(cfg.to_dict())


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
                ) -> RunConfig:
    """Load a YAML run config (defaults when ``path`` is None) and apply ``--set`` overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, "
                              f"got {type(loaded).__name__}")
        data = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        set_path(data, key, value)
        source_note = " (with --set overrides)"
        if not source.endswith(source_note):
            source += source_note
    folder = Path(path).parent if path is not None else Path("configs")
    try:
        expand_methods(data, folder)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return from_dict(data, source)


def read_catalogue(path: Path) -> dict[str, list[str]]:
    """The method catalogue at ``path``: entry name -> ``key.path=value`` overrides."""
    if not path.is_file():
        raise ConfigError(f"experiment.catalogue: {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"experiment.catalogue: {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"experiment.catalogue: {path}: expected a mapping of name -> list of "
                          f"key.path=value overrides")
    for name, items in data.items():
        if not isinstance(items, list) or not all(isinstance(i, str) and "=" in i
                                                  for i in items):
            raise ConfigError(f"{path}: entry {name!r}: expected a list of key.path=value "
                              f"overrides, got {items!r}")
    return data


def expand_methods(data: dict[str, Any], folder: Path) -> None:
    """Replace, in ``data['experiment']['methods']``, every item without ``=`` by the overrides
    of that entry of the method catalogue (``experiment.catalogue``, relative to ``folder``).
    ``methods`` may also be a list of catalogue names (each row named after its entry)."""
    exp = data.get("experiment")
    if not isinstance(exp, dict) or "methods" not in exp:
        return
    methods = exp["methods"]
    if isinstance(methods, list) and all(isinstance(m, str) for m in methods):
        methods = {m: [m] for m in methods}
    if not isinstance(methods, dict):
        return                              # the schema check names the problem
    catalogue: Optional[dict[str, list[str]]] = None
    path = folder / str(exp.get("catalogue", CATALOGUE))
    rows = {}
    for name, items in methods.items():
        if not isinstance(items, list):
            rows[name] = items
            continue
        rows[name] = []
        for item in items:
            if isinstance(item, str) and "=" not in item:
                catalogue = read_catalogue(path) if catalogue is None else catalogue
                if item not in catalogue:
                    raise ConfigError(f"experiment.methods.{name}: {item!r} is neither a "
                                      f"key.path=value override nor an entry of {path} "
                                      f"(entries: {', '.join(catalogue)})")
                rows[name] += catalogue[item]
            else:
                rows[name].append(item)
    exp["methods"] = rows


def with_overrides(cfg: RunConfig, items: list, source: str = "overrides") -> RunConfig:
    """A validated copy of ``cfg`` with ``key.path=value`` texts (or ``(key, value)`` pairs)."""
    data = to_plain(cfg)
    for item in items:
        key, value = parse_override(item) if isinstance(item, str) else item
        set_path(data, key, value)
    return from_dict(data, source)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML (every key, defaults included) so a run can be repeated exactly."""
    Path(path).write_text(yaml.safe_dump(to_plain(cfg), sort_keys=False))
