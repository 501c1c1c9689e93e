"""Typed federation config: kebab-case run-config keys -> a frozen dataclass, unknown keys and bad ranges refused.

Defaults make an EMPTY run config work (``run_simulation`` passes none). They are read from the library's
dataclasses (PretrainConfig, MLPTrainConfig, shared.distill), never restated; None means "the library
chooses" (written "auto" in the run config, or "" for a path or name). pyproject.toml's
[tool.flwr.app.config] writes the same defaults (tests/server/test_config.py fails when they drift).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from shared.device import CHOICES as DEVICE_CHOICES
from shared.distill import DECODE_MODE, Init
from shared.errors import ConfigError
from shared.evaluation import MLPTrainConfig
from shared.models.vae import DecodeMode
from shared.pretrain import PretrainConfig
from shared.privacy.spec import DPSpec
from shared.protocol import SiteSpec

# Where a run without out-dir writes: deploy/coordinator/start-superlink.sh sets it under the coordinator's
# state directory.
OUT_DIR_ENV = "FEDSCDD_OUT_DIR"
# The library defaults the run config starts from (one source: these dataclasses).
_PRETRAIN = PretrainConfig()
_MLP = MLPTrainConfig()
# How a run config (TOML: no null) writes None: "auto" for a value the library chooses, "" for an absent path or name.
AUTO = "auto"
SITE_DIM = 8  # size of the VAE's site vector under site-covariate (scVI's batch one-hot has one entry per batch)


@dataclass(frozen=True)
class FederationConfig:
    """Everything the ServerApp reads from the run config (client-only keys included, so none is unknown)."""

    # data (the sim-* keys are read by simulated sites; deployed sites use their node config)
    sim_data_path: str | None = None  # None: the bundled example (source checkout only)
    sim_site_key: str = "batch"
    sim_num_sites: int = 3
    label_key: str = "cell_type"
    expect: Literal["auto", "counts", "lognorm"] = "auto"
    min_cells_per_class: int = 2
    test_fraction: float = 0.2
    # validation cells at every site: scored every round (metrics.json "validation"), never trained on
    val_fraction: float = 0.1
    min_coverage: float = 0.5
    # plan and models
    n_genes: int = 2000
    latent_dim: int | None = None  # None: from the plan's gene count (shared.pretrain.latent_dim_for)
    # federated pretraining (FedAvg): rounds x local steps per site
    pretrained_path: str | None = None
    # 30 rounds x 100 VAE / 50 SCDG steps: the pooled budget (3000 / 1500 steps) in short rounds; chosen on validation
    # cells (benchmarks/pretraining_screen.sh, benchmarks/results/pretraining_screen.md)
    num_pretrain_rounds: int = 30
    vae_local_steps: int = 100
    scdg_local_steps: int = 50
    pretrain_lr: float | None = None  # None: each model's PretrainConfig learning rate
    vae_batch_size: int = _PRETRAIN.vae.batch_size
    scdg_batch_size: int = _PRETRAIN.scdg.batch_size
    # how the server combines the sites' updates (server.aggregation) and what the sites optimise
    server_optimizer: Literal["fedavg", "fedavgm", "fedadam", "fedyogi"] = "fedavg"
    server_lr: float | None = None  # None: the optimiser's default (server.aggregation.DEFAULT_SERVER_LR)
    # average a class's rows (label head, class embeddings, QA head) over the sites that have it
    class_aware_aggregation: bool = False
    proximal_mu: float = 0.0  # FedProx: sites add mu/2 * ||w - w_global||^2 to their local loss
    # "keep": a site continues its AdamW moments from its previous round of the same model (they never leave it);
    # "reset": fresh moments every round
    site_optimizer_state: Literal["reset", "keep"] = "reset"
    # "cosine": the sites' learning rate falls from the stage's to a tenth over the rounds (server.fedavg.local_lr)
    local_lr_decay: Literal["none", "cosine"] = "none"
    # the class heads (VAE label head, SCDG QA head) train with each site's class frequencies added to their logits
    # (balanced softmax), so a site's label mix does not bias the shared heads (shared.fitting.balanced_heads)
    balanced_class_heads: bool = False
    # "scaffold": SCAFFOLD's control variates correct every local gradient for client drift (shared.drift); doubles the
    # pretraining upload (each site also sends its variate's change)
    drift_control: Literal["none", "scaffold"] = "none"
    init_path: str | None = None  # a `scdd pretrain` directory: FedAvg starts from its VAE/SCDG
    # a learned site vector joins the VAE's encoder and decoder inputs (scVI's batch covariate, FedBN's idea: site
    # effects kept out of the shared weights); each site trains its own, FedAvg averages the rest. The server decodes
    # a site's codes with that site's vector ("own") or with the sites' average ("neutral"). server.fedavg
    site_covariate: Literal["off", "own", "neutral"] = "off"
    # distillation rounds
    cells_per_class: int = 10
    # later rounds (warm start, fine-tuned generator) gained nothing on validation cells: benchmarks/rounds_screen.sh
    num_distill_rounds: int = 1
    distill_iterations: int | None = None  # None: chosen from k (shared.distill.resolve_iterations)
    distill_t_star: int | None = None  # None: chosen from k (shared.distill.resolve_t_star)
    distill_init: Init | None = None  # None: DistillConfig's default
    distill_guidance: float | None = None  # guidance of the codes' one denoising step; None: DistillConfig's (2.0)
    distill_warm_start: bool = True  # rounds >= 2 start from each site's previous codes
    # how codes become cells; None ("auto"): DECODE_MODE, or "gaussian" under DP with statistics pretraining
    # (``resolved_decode_mode``; benchmarks/results/dp_curve.md)
    decode_mode: DecodeMode | None = None
    # "sample" / "counts" / "gaussian": cells drawn from each code (more cells, no more upload;
    # benchmarks/results/decode_screen.md)
    samples_per_code: int = 10
    # cell-level differential privacy of everything a site releases (shared.privacy, client.privacy); 0 = off
    dp_epsilon: float = 0.0
    dp_delta: float | None = None  # None: 1 / (10 x training cells) at each site
    dp_max_grad_norm: float = 1.0  # DP-SGD: per-cell gradient clipping bound
    # how the shared models learn under DP: "statistics" (each site releases its per-class gene means once, the
    # server trains the VAE and SCDG on cells drawn around them: server.dp_pretrain) or "dp-sgd" (FedAvg rounds of
    # DP-SGD at the sites). Chosen on validation cells: benchmarks/results/dp_curve.md
    dp_pretraining: Literal["statistics", "dp-sgd"] = "statistics"
    # with statistics pretraining, how the coordinator denoises the sites' released class means (post-processing):
    # "site" (each site's release alone), "joint" (every site's together: the directions the sites' classes share
    # are kept) or "class" (each class pooled over the sites that released it, site effects apart;
    # shared.privacy.denoise). Chosen on validation cells: benchmarks/results/dp_curve.md
    dp_denoise: Literal["site", "joint", "class"] = "site"
    # with statistics pretraining, each site's decoded cells of a class are shifted so that their mean is the class mean
    # the site released, as denoised (post-processing: the decoder's error on that mean is taken out). Chosen on
    # validation cells: benchmarks/results/dp_curve.md
    dp_recenter: bool = True
    # without DP, each site sends its training cells' per-class gene means with its codes (classes of at least
    # shared.counts.MIN_CELLS cells; C x G floats) and its decoded cells of each class are scaled onto them (the shared
    # decoder's error on a site's class mean taken out, each gene's spread scaled with it). Chosen on validation cells:
    # benchmarks/results/decode_screen.md
    recenter: bool = True
    # server-side fine-tuning and evaluation models
    finetune_steps: int = 20
    finetune_lr: float = 1e-5
    finetune_anchor_weight: float = 1e-3
    # the evaluation MLP: ceil(epochs * cells / 256) steps within [min, max] (shared.evaluation.MLPTrainConfig)
    mlp_epochs: float = _MLP.epochs
    mlp_min_steps: int = _MLP.min_steps
    mlp_max_steps: int = _MLP.max_steps
    # participation and deadlines
    min_sites: int = 2
    expected_sites: int = 0  # 0: start as soon as min-sites SuperNodes are connected
    site_wait_s: float = 300.0
    round_timeout_s: float = 600.0
    # outputs
    out_dir: str | None = None  # None: $FEDSCDD_OUT_DIR (set by deploy/coordinator/start-superlink.sh), else ./scdd-out
    run_id: str | None = None  # None: run-<flower run id>
    resume: bool = False
    report: bool = True
    seed: int = 0
    torch_threads: int = 1  # 0: torch default (all cores)
    # where each site's models run (shared.device): cpu | auto (a GPU when the site has one) | cuda | cuda:N
    device: str = "cpu"

    def __post_init__(self) -> None:
        checks = [
            (self.n_genes >= 10, "n-genes must be >= 10"),
            (self.latent_dim is None or self.latent_dim >= 2, "latent-dim must be auto (from the gene count) or >= 2"),
            (self.cells_per_class >= 1, "cells-per-class must be >= 1"),
            (self.num_distill_rounds >= 1, "num-distill-rounds must be >= 1"),
            (self.num_pretrain_rounds >= 0, "num-pretrain-rounds must be >= 0"),
            (
                self.vae_local_steps >= 1 and self.scdg_local_steps >= 1,
                "vae-local-steps and scdg-local-steps must be >= 1",
            ),
            (self.vae_batch_size >= 1 and self.scdg_batch_size >= 1, "vae-batch-size and scdg-batch-size must be >= 1"),
            (self.pretrain_lr is None or self.pretrain_lr > 0, "pretrain-lr must be > 0 (or auto)"),
            (self.min_sites >= 1, "min-sites must be >= 1"),
            (self.expected_sites >= 0, "expected-sites must be >= 0"),
            (self.site_wait_s > 0 and self.round_timeout_s > 0, "site-wait-s and round-timeout-s must be > 0"),
            (
                0 <= self.test_fraction < 1
                and 0 <= self.val_fraction < 1
                and self.test_fraction + self.val_fraction < 1,
                "test-fraction and val-fraction must be in [0, 1) with a sum below 1",
            ),
            (self.min_cells_per_class >= 1, "min-cells-per-class must be >= 1"),
            (0 <= self.min_coverage <= 1, "min-coverage must be in [0, 1]"),
            (
                self.distill_iterations is None or self.distill_iterations >= 0,
                "distill-iterations must be >= 0 (or auto)",
            ),
            (self.distill_t_star is None or self.distill_t_star >= 0, "distill-t-star must be >= 0 (or auto)"),
            (
                self.distill_guidance is None or 0 <= self.distill_guidance <= 10,
                "distill-guidance must be within 0..10 (or auto)",
            ),
            (1 <= self.samples_per_code <= 20, "samples-per-code must be within 1..20"),
            (self.finetune_steps >= 0, "finetune-steps must be >= 0"),
            (
                self.finetune_lr > 0 and self.finetune_anchor_weight >= 0,
                "finetune-lr must be > 0, finetune-anchor-weight >= 0",
            ),
            (self.sim_num_sites >= 1 and self.torch_threads >= 0, "sim-num-sites must be >= 1, torch-threads >= 0"),
            (
                self.pretrained_path is not None or self.num_pretrain_rounds >= 1,
                "num-pretrain-rounds must be >= 1 unless pretrained-path is set",
            ),
            (
                self.server_lr is None or self.server_lr > 0,
                "server-lr must be > 0 (or auto for the optimiser's default)",
            ),
            (0 <= self.proximal_mu < 1e6, "proximal-mu must be >= 0"),
            (
                not (self.init_path and self.pretrained_path),
                "set init-path (start FedAvg from a reference) or pretrained-path (no FedAvg), not both",
            ),
            (re.fullmatch(r"cpu|auto|cuda(:\d+)?", self.device) is not None, f"device must be {DEVICE_CHOICES}"),
            (
                not (self.balanced_class_heads and self.dp_epsilon > 0),
                "balanced-class-heads reads the site's exact class counts in every DP-SGD step; use it without "
                "dp-epsilon",
            ),
            (
                not (self.init_path and self.dp_epsilon > 0 and self.dp_pretraining == "statistics"),
                "init-path starts FedAvg, which dp-pretraining=statistics replaces; set dp-pretraining=dp-sgd or drop "
                "init-path",
            ),
            (
                self.site_covariate == "off" or not (self.dp_epsilon > 0 or self.pretrained_path or self.init_path),
                "site-covariate trains a site vector during FedAvg pretraining at the sites; it is not available with "
                "dp-epsilon, pretrained-path or init-path in this release: set site-covariate=off",
            ),
            (
                self.drift_control == "none" or self.dp_epsilon == 0,
                "drift-control=scaffold sends each site's gradient estimate, which DP does not cover in this release; "
                "set drift-control=none with dp-epsilon",
            ),
            (
                self.device == "cpu" or self.dp_epsilon == 0,
                "device must be 'cpu' when dp-epsilon > 0 (the DP path runs on CPU in this release)",
            ),
        ]
        errors = [text for ok, text in checks if not ok]
        errors += [
            f"{f.name.replace('_', '-')} must be one of {', '.join(map(str, choices))}, got {getattr(self, f.name)!r}"
            for f, (_, choices, _) in _fields().items()
            if choices and getattr(self, f.name) is not None and getattr(self, f.name) not in choices
        ]
        try:
            _ = self.mlp
        except ValueError as exc:
            errors.append(f"mlp-epochs / mlp-min-steps / mlp-max-steps give an invalid rule ({exc})")
        try:
            self.dp_spec("check").check()
        except ValueError as exc:
            errors.append(str(exc))
        if errors:
            msg = (
                "invalid run config: "
                + "; ".join(errors)
                + "; fix the values in [tool.flwr.app.config] or --run-config"
            )
            raise ConfigError(msg)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """All run-config keys, kebab-case."""
        return tuple(f.name.replace("_", "-") for f in dataclasses.fields(cls))

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """Map kebab-case keys to fields, refusing unknown keys and values of the wrong type.

        A field that may be None reads it as "auto" (a value the library chooses) or "" (an absent path or name).
        """
        fields = {f.name: kind for f, kind in _fields().items()}
        unknown = sorted(k for k in run_config if "_" in k or k.replace("-", "_") not in fields)
        if unknown:
            msg = f"unknown run-config keys {unknown}; known keys: {', '.join(cls.keys())}"
            raise ConfigError(msg)
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            values[name] = _coerce(key, value, *fields[name])
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """Kebab-case dict of run-config values (config.json, subprocess runs): None as "auto" or ""."""
        return {
            f.name.replace("_", "-"): _toml_none(kind, choices)
            if getattr(self, f.name) is None
            else getattr(self, f.name)
            for f, (kind, choices, _) in _fields().items()
        }

    @property
    def spec(self) -> SiteSpec:
        """How sites prepare their data (DP keyed by run-id; the ServerApp uses ``site_spec`` with the run's name)."""
        return self.site_spec(self.run_id or "")

    def site_spec(self, run_key: str) -> SiteSpec:
        """How sites prepare their data and what they may release, for the run named ``run_key``."""
        return SiteSpec(
            label_key=self.label_key,
            expect=self.expect,
            min_cells_per_class=self.min_cells_per_class,
            test_fraction=self.test_fraction,
            split_seed=self.seed,
            min_coverage=self.min_coverage,
            val_fraction=self.val_fraction,
            dp=self.dp_spec(run_key),
        )

    def dp_spec(self, run_key: str) -> DPSpec:
        """The DP plan the sites receive: target and the pretraining schedule they compose (off at dp-epsilon 0)."""
        if self.dp_epsilon == 0:
            return DPSpec()
        from server.fedavg import budgets  # the stage budgets (run config over PretrainConfig's defaults)
        from shared.distill import DistillConfig, resolve_gene_mean_weight

        vae, scdg = budgets(self)
        statistics = self.dp_pretraining == "statistics" and not self.pretrained_path
        rounds = 0 if self.pretrained_path or statistics else self.num_pretrain_rounds
        return DPSpec(
            self.dp_epsilon,
            self.dp_delta,
            self.dp_max_grad_norm,
            run_key or "unnamed",
            rounds,
            vae.steps,
            vae.batch_size,
            scdg.steps,
            scdg.batch_size,
            statistics or resolve_gene_mean_weight(DistillConfig(k=self.cells_per_class), private=True) > 0,
            library_stats=not statistics,  # models trained on drawn cells have no count head: nothing would read them
        )

    @property
    def resolved_decode_mode(self) -> DecodeMode:
        """decode-mode with "auto" resolved: "gaussian" when DP pretraining trains the models on cells drawn around the
        released class means (decoded cells are then about as tight as those means; chosen on validation cells,
        benchmarks/results/dp_curve.md), DECODE_MODE otherwise."""
        if self.decode_mode is not None:
            return self.decode_mode
        return "gaussian" if self.statistics_pretraining else DECODE_MODE

    @property
    def statistics_pretraining(self) -> bool:
        """Under DP, the server trains the models on cells drawn around the sites' released class means
        (server.dp_pretrain) rather than FedAvg or stored models."""
        return self.dp_epsilon > 0 and self.dp_pretraining == "statistics" and not self.pretrained_path

    @property
    def site_dim(self) -> int:
        """Size of the VAE's site vector: SITE_DIM with a site covariate, else 0."""
        return 0 if self.site_covariate == "off" else SITE_DIM

    @property
    def mlp(self) -> MLPTrainConfig:
        """How the server trains the evaluation MLP on the fused cells (the benchmark's rule unless overridden)."""
        return MLPTrainConfig(epochs=self.mlp_epochs, min_steps=self.mlp_min_steps, max_steps=self.mlp_max_steps)

    def run_dir(self, run_id: str) -> Path:
        """out-dir/<run-id>, absolute; without out-dir, the coordinator's FEDSCDD_OUT_DIR, else ./scdd-out."""
        base = self.out_dir or os.environ.get(OUT_DIR_ENV, "") or "scdd-out"
        return (Path(base).expanduser() / (self.run_id or run_id)).resolve()


@functools.cache
def _fields() -> dict[dataclasses.Field[Any], tuple[type, tuple[Any, ...], bool]]:
    """Per field: its value type, its allowed values (a Literal; empty otherwise) and whether it may be None."""
    hints = get_type_hints(FederationConfig)
    out: dict[dataclasses.Field[Any], tuple[type, tuple[Any, ...], bool]] = {}
    for f in dataclasses.fields(FederationConfig):
        union = get_origin(hints[f.name]) in (Union, types.UnionType)
        args = get_args(hints[f.name]) if union else (hints[f.name],)
        optional = type(None) in args
        (hint,) = [a for a in args if a is not type(None)]
        choices = get_args(hint) if get_origin(hint) is Literal else ()
        out[f] = (type(choices[0]) if choices else hint, choices, optional)
    return out


def _toml_none(kind: type, choices: tuple[Any, ...]) -> str:
    """How the run config writes None: "" for a path or name, "auto" for a value the library chooses."""
    return "" if kind is str and not choices else AUTO


def _coerce(key: str, value: Any, kind: type, choices: tuple[Any, ...], optional: bool) -> Any:
    """Run-config value -> field type (TOML ints are accepted for floats; "auto" / "" -> None where allowed)."""
    if optional and value == _toml_none(kind, choices):
        return None
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        auto = f' or "{_toml_none(kind, choices)}"' if optional else ""
        msg = f"run-config key '{key}' must be a {kind.__name__}{auto}, got {type(value).__name__} {value!r}"
        raise ConfigError(msg)
    return value
