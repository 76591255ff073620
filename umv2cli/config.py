"""Typed, validated model configs.

A `ModelConfig` is a frozen dataclass: the backbone (a decoder-only transformer with a SwiGLU FFN
in every block) plus at most one kind of sparse layer, placed in chosen blocks:

    sparse = None             dense baseline
    UltraMemV2Config          every block, parallel to the FFN on the same normed input (paper §3.2)
    UltraMemV1Config          skip-layer pairs "a:b" (arXiv 2411.12364)
    PKMConfig                 product-key memory; with swilu + qk_norm + shared_pool it is Memory+
    PEERConfig                product keys over single-neuron experts (arXiv 2407.04153)
    MoEConfig                 fine-grained top-k mixture of SwiGLU experts (OLMoE)

Placement (every sparse config has it): ``placement = "all"`` puts a layer in every block reading
and writing the same block; ``"middle"`` one in block L//2; ``"a:b/c:d"`` (the official code's `mem_insert_way`, blocks counted
from 0) reads the normed FFN input of block a and adds the output after block b. With
``replace_ffn = true`` the layer takes the place of the FFN of its block (a must equal b).

Every check raises `UserError` naming the field and the fix. `config_from_dict` builds a config
from plain data (TOML/JSON), reporting every problem at once; a ``preset`` key starts from a
preset and overrides its fields.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from umv2cli.errors import UserError

InitScheme = Literal["paper", "official"]


def parse_placement(placement: str, n_layers: int) -> list[tuple[int, int]]:
    """``"all"`` → [(0, 0), (1, 1), …]; ``"middle"`` → [(L//2, L//2)]; ``"2:5/6:9"`` → [(2, 5), (6, 9)]
    (read block, write block)."""
    if placement == "all":
        return [(i, i) for i in range(n_layers)]
    if placement == "middle":
        return [(n_layers // 2, n_layers // 2)]
    pairs = []
    for part in placement.split("/"):
        read, sep, write = part.partition(":")
        if not (sep and read.strip().isdigit() and write.strip().isdigit()):
            raise UserError(f"sparse.placement={placement!r}: expected \"all\", \"middle\" or pairs like \"2:5/6:9\"")
        pairs.append((int(read), int(write)))
    return pairs


# ----------------------------------------------------------------------------------------------
# sparse layers


@dataclass(frozen=True)
class UltraMemV2Config:
    """UltraMemV2 memory layer (arXiv 2508.18756 §3; docs/fidelity.md §2). Defaults: the 227M/1.2B row
    of Table 10."""

    kind: Literal["ultramemv2"] = "ultramemv2"
    knum: int = 360
    """n: keys per side; each layer's home table has n² rows (Table 10: 360)."""
    topm: int = 32
    """m: values activated per token per layer (Table 10: 32)."""
    dk: int = 192
    """D_k: query/key dim per side, row or column (Table 10: 192)."""
    dv: int = 192
    """D_v: value dim; split into `cores` chunks (Table 10: 192)."""
    dp: int = 192
    """D_p: pre-value dim of the PEER-style neuron (Table 10: 192); 0 = no neuron, values are
    weighted by their scores alone (the "value embedding" baseline of §4.2.1)."""
    k_rc: int | None = None
    """Row/column candidates before the grid; None means min(topm, 128) (§4.1 caps it at 128),
    and at most the keys per side."""
    rank: int = 2
    """r: Tucker rank (v1 Table 5 and the code: 2)."""
    cores: int = 2
    """C: Tucker cores of multi-core scoring (MCS); 2 in the paper and the code."""
    key_expand: int = 1
    """E_k: key expansion; the virtual grid is (E_k·n)² slots over the physical table (§3.3)."""
    share_layers: int = 1
    """g: layer tables in each layer's ring window of the shared value pool (§4.2.8, Sg-Ring);
    1 = no sharing. Keys per side grow to isqrt(g·n²)."""
    shared_rank_query: bool = False
    """True reproduces the official code: one row and one column query shared by all ranks
    (docs/fidelity.md §9.3). False: per-side, per-rank queries as the paper states."""
    pre_value_act: Literal["none", "gelu"] = "none"
    """Activation on the pre-value neuron z (eq. 15: none; the code's mem_use_glu_act: GELU)."""
    kernels: Literal["auto", "triton", "torch"] = "auto"
    """The selection (steps 4-6) and the value lookup (steps 8-9) by the Triton kernels of
    `umv2cli.kernels` or the plain-PyTorch references; "auto" = Triton on CUDA, the references on
    CPU. Both train the same model."""
    placement: str = "all"
    replace_ffn: bool = False

    def __post_init__(self) -> None:
        if self.k_rc is None:
            object.__setattr__(self, "k_rc", min(self.topm, 128, self.keys_per_side))
        problems = _positive(self, "knum", "topm", "dk", "dv", "k_rc", "rank", "cores",
                             "key_expand", "share_layers")
        if self.dp < 0:
            problems.append(f"sparse.dp={self.dp}: must be ≥ 0 (0 = no pre-value neuron)")
        if not problems:
            if self.dv % self.cores:
                problems.append(f"sparse.dv={self.dv}: must be divisible by sparse.cores={self.cores} "
                                "(the value is split into one chunk per core)")
            if self.k_rc > self.keys_per_side:
                problems.append(f"sparse.k_rc={self.k_rc}: exceeds the {self.keys_per_side} keys per side; "
                                "lower k_rc or raise knum")
            if self.topm > self.k_rc**2:
                problems.append(f"sparse.topm={self.topm}: exceeds the k_rc² = {self.k_rc**2} grid candidates; "
                                "lower topm or raise k_rc")
        _raise(problems)

    @property
    def window_knum(self) -> int:
        """Keys per side of one layer's window before key expansion: isqrt(g·n²) (docs/fidelity.md §2.4)."""
        return math.isqrt(self.share_layers * self.knum**2)

    @property
    def keys_per_side(self) -> int:
        """E_k·isqrt(g·n²): row (and column) keys of one layer."""
        return self.key_expand * self.window_knum


@dataclass(frozen=True)
class UltraMemV1Config:
    """UltraMem v1 (arXiv 2411.12364): TDQKR + MCS + implicit value expansion with E projectors,
    skip-layer placement, Tucker singular-value aux loss. Defaults: the 227M row of Table 10."""

    kind: Literal["ultramem"] = "ultramem"
    knum: int = 808
    """n: physical keys per side; the physical table has n² rows (Table 10: 808)."""
    topm: int = 80
    """m: values per head per token (Table 10: 2×80)."""
    heads: int = 2
    dk: int = 192
    dv: int = 384
    rank: int = 2
    cores: int = 2
    value_expand: int = 4
    """E: virtual memory blocks, each with its own output projector (v1 Table 5: 4). Must be a
    square: keys per side grow to sqrt(E)·n."""
    aux_coef: float = 0.001
    """α of the Tucker singular-value penalty (v1 Table 5)."""
    aux_tau: float = 0.15
    """τ: margin of that penalty (v1 Table 5)."""
    placement: str = "2:5/6:9/10:13/14:17"
    replace_ffn: bool = False

    def __post_init__(self) -> None:
        problems = _positive(self, "knum", "topm", "heads", "dk", "dv", "rank", "cores", "value_expand")
        if not problems:
            if math.isqrt(self.value_expand) ** 2 != self.value_expand:
                problems.append(f"sparse.value_expand={self.value_expand}: must be a square (1, 4, 9, 16)")
            if self.dv % self.cores:
                problems.append(f"sparse.dv={self.dv}: must be divisible by sparse.cores={self.cores}")
            elif self.topm > math.isqrt(self.value_expand) * self.knum:
                problems.append(f"sparse.topm={self.topm}: exceeds the sqrt(value_expand)·knum = "
                                f"{math.isqrt(self.value_expand) * self.knum} keys per side; lower topm or raise knum")
        _raise(problems)


@dataclass(frozen=True)
class PKMConfig:
    """Product-key memory (Lample et al. 2019). With swilu, qk_norm and shared_pool it is Memory+
    (Berges et al. 2024, eq. 2). Defaults: the Memory+ 227M row of Table 10 (D_v = 768, §4.1 †)."""

    kind: Literal["pkm"] = "pkm"
    knum: int = 1138
    """n: sub-keys per half; the table has n² rows."""
    topm: int = 80
    """k: values per head per token, after a softmax over their scores."""
    heads: int = 2
    dk: int = 384
    """Query dim per head; each half-query (and sub-key) has dk/2."""
    dv: int = 768
    swilu: bool = True
    """Memory+ gating: out = (y ⊙ silu(x W1)) W2."""
    qk_norm: bool = True
    shared_pool: bool = True
    """One value table shared by all PKM layers of the model (Memory+)."""
    placement: str = "4:4/8:8/12:12/16:16"
    replace_ffn: bool = True

    def __post_init__(self) -> None:
        _raise(_product_key_problems(self, "dv"))


@dataclass(frozen=True)
class PEERConfig:
    """PEER (arXiv 2407.04153): product keys over knum² single-neuron experts, multi-head."""

    kind: Literal["peer"] = "peer"
    knum: int = 1024
    """√N: sub-keys per half; N = knum² experts (PEER §3: 1024²)."""
    topm: int = 16
    """k: experts per head per token (PEER §3: 16)."""
    heads: int = 8
    dk: int = 256
    """Query dim per head; each half-query has dk/2."""
    act: Literal["gelu", "relu"] = "gelu"
    placement: str = "middle"
    """PEER §3 replaces the FFN of the middle block."""
    replace_ffn: bool = True

    def __post_init__(self) -> None:
        _raise(_product_key_problems(self))


@dataclass(frozen=True)
class MoEConfig:
    """Fine-grained mixture of SwiGLU experts, top-k routing, dropless (OLMoE; docs/fidelity.md §8.5)."""

    kind: Literal["moe"] = "moe"
    n_experts: int = 64
    topk: int = 8
    expert_hidden: int = 384
    """SwiGLU inner width of one expert (OLMoE-227M: 384)."""
    shared_expert_hidden: int = 0
    """Inner width of an always-on shared expert; 0 = none."""
    lb_coef: float = 0.01
    """Load-balance loss weight (OLMoE: 0.01), on the mean of the layers' losses (OLMoE's code)."""
    z_coef: float = 0.001
    """Router z-loss weight (OLMoE: 0.001), on the mean of the layers' z-losses divided by topk, as
    OLMoE's code applies it."""
    experts: Literal["auto", "grouped", "loop"] = "auto"
    """How the routed experts run: one grouped GEMM per projection (`torch._grouped_mm` on CUDA),
    or a loop of one matmul per expert (the reference); "auto" = grouped on CUDA when d_model and
    expert_hidden are multiples of 8, the loop otherwise. Both train the same model."""
    placement: str = "all"
    replace_ffn: bool = True

    def __post_init__(self) -> None:
        problems = _positive(self, "n_experts", "topk", "expert_hidden")
        if not problems and self.topk > self.n_experts:
            problems.append(f"sparse.topk={self.topk}: exceeds n_experts={self.n_experts}")
        if self.shared_expert_hidden < 0:
            problems.append(f"sparse.shared_expert_hidden={self.shared_expert_hidden}: must be ≥ 0")
        _raise(problems)


SparseConfig = Union[UltraMemV2Config, UltraMemV1Config, PKMConfig, PEERConfig, MoEConfig]
SPARSE_KINDS: dict[str, type] = {
    "ultramemv2": UltraMemV2Config,
    "ultramem": UltraMemV1Config,
    "pkm": PKMConfig,
    "peer": PEERConfig,
    "moe": MoEConfig,
}


# ----------------------------------------------------------------------------------------------
# the model


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer (RMSNorm, RoPE, SwiGLU) with an optional sparse layer."""

    d_model: int
    """h: hidden size."""
    n_layers: int
    """L: transformer blocks."""
    n_heads: int
    """Attention heads; d_model / n_heads must be even (RoPE rotates pairs)."""
    ffn_hidden: int
    """SwiGLU inner width (OLMo's mlp_hidden_size / 2). 0 only when every FFN is replaced."""
    vocab_size: int = 50304
    """Embedding rows (OLMoE: 50280 tokens padded to 50304)."""
    seq_len: int = 2048
    """Context length: the RoPE table size and the attention-score FLOPs of the accounting."""
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init: InitScheme = "paper"
    """`paper`: App. A (small init, eq. 26 value std, calibrated norm weights);
    `official`: the official code's choices (docs/fidelity.md §3.2)."""
    sparse: SparseConfig | None = None

    def __post_init__(self) -> None:
        problems = _positive(self, "d_model", "n_layers", "n_heads", "vocab_size", "seq_len")
        if self.ffn_hidden < 0:
            problems.append(f"ffn_hidden={self.ffn_hidden}: must be ≥ 0")
        if not problems and (self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2):
            problems.append(f"n_heads={self.n_heads}: d_model={self.d_model} must split into heads of even size")
        if self.init not in ("paper", "official"):
            problems.append(f"init={self.init!r}: must be one of 'paper', 'official'")
        if self.sparse is not None and not problems:
            problems += _placement_problems(self.sparse, self.n_layers)
            if self.ffn_hidden == 0 and self.ffn_blocks() != set():
                problems.append("ffn_hidden=0: blocks without a replacing sparse layer need an FFN; "
                                "set ffn_hidden > 0")
        elif self.ffn_hidden == 0 and not problems:
            problems.append("ffn_hidden=0: a dense model needs an FFN; set ffn_hidden > 0")
        _raise(problems)

    def sparse_pairs(self) -> list[tuple[int, int]]:
        """(read block, write block) of each sparse layer, in order; [] for a dense model."""
        return [] if self.sparse is None else parse_placement(self.sparse.placement, self.n_layers)

    def ffn_blocks(self) -> set[int]:
        """Blocks that keep their dense FFN."""
        replaced = {a for a, _ in self.sparse_pairs()} if self.sparse and self.sparse.replace_ffn else set()
        return set(range(self.n_layers)) - replaced

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _placement_problems(sparse: SparseConfig, n_layers: int) -> list[str]:
    try:
        pairs = parse_placement(sparse.placement, n_layers)
    except UserError as e:
        return e.problems
    problems = []
    for read, write in pairs:
        if not (0 <= read <= write < n_layers):
            problems.append(f"sparse.placement={sparse.placement!r}: pair {read}:{write} needs "
                            f"0 ≤ read ≤ write < n_layers={n_layers}")
        elif sparse.replace_ffn and read != write:
            problems.append(f"sparse.placement={sparse.placement!r}: replace_ffn needs pairs a:a, got {read}:{write}")
    if len({r for r, _ in pairs}) != len(pairs):
        problems.append(f"sparse.placement={sparse.placement!r}: a block may host one sparse layer only")
    if isinstance(sparse, UltraMemV2Config) and sparse.share_layers > len(pairs):
        problems.append(f"sparse.share_layers={sparse.share_layers}: exceeds the {len(pairs)} memory layers "
                        "whose tables form the pool; lower share_layers")
    return problems


# ----------------------------------------------------------------------------------------------
# a training run


MAX_SEED = 2**63
"""Seeds are below this: numpy and torch seed with 64-bit integers."""


@dataclass(frozen=True)
class TrainConfig:
    """How one run trains (docs/fidelity.md §4 for the defaults that come from the official code)."""

    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per micro-batch."""
    seq_len: int | None = None
    """Tokens per sequence; None = the model's seq_len."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate."""
    schedule: Literal["cosine", "wsd"] = "cosine"
    """Warmup then cosine to min_lr_ratio·lr, or WSD: warmup, constant, linear cooldown."""
    warmup: float = 0.01
    """Fraction of the steps spent warming up linearly (the official runs: ≈1-2%)."""
    cooldown: float = 0.2
    """WSD only: fraction of the steps of the final decay."""
    min_lr_ratio: float = 0.1
    """Final lr / peak lr (the official code's alpha_f = 0.1)."""
    weight_decay: float = 0.1
    """AdamW weight decay, on every parameter as in the official code (docs/fidelity.md §9.18)."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 = no clipping."""
    value_lr_mult: float = 1.0
    """Learning-rate multiplier of the memory tables (V2 §4.2.9: 1× is best for long runs)."""
    value_lr_decay: bool = False
    """Decay that multiplier linearly from value_lr_mult× to 1× over the run (UltraMem v1 style)."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    eval_batches: int = 4
    """Validation micro-batches per evaluation."""
    task_samples: int = 32
    """Sequences per memory task per evaluation (0: skip the memory tasks)."""
    ckpt_every: int = 0
    """Checkpoint every N steps (0: only at the end and on SIGTERM/SIGUSR1/SIGUSR2)."""
    seed: int = 0
    """Seeds the weights and the data order."""
    device: str = "auto"
    """"auto" (CUDA when there is one), "cpu", "cuda", "cuda:N"."""
    compile: bool = False
    """Run the model through torch.compile."""
    data_parallel: Literal["ddp", "fsdp"] = "ddp"
    """Runs on several processes (torchrun, `--gpus-per-run`, Slurm's nodes × gpus): each holds the dense
    backbone whole and averages gradients (DDP), or a 1/world share of it, its gradients and its optimizer
    state (FSDP2's fully_shard). Either way each process reads its own slice of every batch."""
    memory_parallel: int = 1
    """Processes that split each UltraMemV2 / Memory+ value table by columns (its pre-values and values);
    the world size must be a multiple. 1: every process holds the tables whole."""

    LAYOUT: typing.ClassVar[tuple[str, ...]] = ("data_parallel", "memory_parallel")
    """The fields that say how a run is spread over processes, not what it trains: a run's identity (its
    sweep run id) leaves them out, and a run may resume under another layout."""

    def __post_init__(self) -> None:
        problems = [f"train.{n}={getattr(self, n)}: must be a positive integer"
                    for n in ("steps", "batch_size", "grad_accum", "eval_batches", "memory_parallel")
                    if getattr(self, n) <= 0]
        if self.seq_len is not None and self.seq_len <= 0:
            problems.append(f"train.seq_len={self.seq_len}: must be positive (or omitted for the model's)")
        problems += [f"train.{n}={getattr(self, n)}: must be a finite number"
                     for n in ("lr", "value_lr_mult", "grad_clip", "weight_decay")
                     if not math.isfinite(getattr(self, n))]
        problems += [f"train.{n}={getattr(self, n)}: must be ≥ 0"
                     for n in ("eval_every", "ckpt_every", "task_samples", "grad_clip", "weight_decay")
                     if getattr(self, n) < 0]
        problems += [f"train.{n}={getattr(self, n)}: must be in [0, 1)"
                     for n in ("warmup", "cooldown", "min_lr_ratio", "beta1", "beta2") if not 0 <= getattr(self, n) < 1]
        if self.lr <= 0 or self.value_lr_mult <= 0:
            problems.append("train.lr and train.value_lr_mult: must be positive")
        if not 0 <= self.seed < MAX_SEED:
            problems.append(f"train.seed={self.seed}: must be in [0, 2^63)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            problems.append(f"train.device={self.device!r}: must be auto, cpu, cuda or cuda:N")
        _raise(problems)


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run: its hash is the run's identity (the sweep's run id)."""

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    data: str = "builtin"
    """A prepared data directory (`umv2 data prepare`), a nanoGPT directory, or "builtin"."""

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": dataclasses.asdict(self.train), "data": self.data}


def layout_problems(spec: RunSpec, world_size: int) -> list[str]:
    """What keeps `spec` from running on `world_size` processes, one line each."""
    cfg, sparse, mp = spec.train, spec.model.sparse, spec.train.memory_parallel
    launch = "torchrun --nproc-per-node, --gpus-per-run, or Slurm nodes × gpus"
    problems = []
    if world_size % mp:
        problems.append(f"train.memory_parallel={mp}: needs a number of processes that is a multiple of {mp}, "
                        f"got {world_size}; launch with {launch}, or set memory_parallel = 1 (to resume a run so: "
                        "umv2 train --resume DIR --memory-parallel 1)")
    if cfg.batch_size % world_size:
        problems.append(f"train.batch_size={cfg.batch_size}: each of the {world_size} processes reads an equal "
                        f"slice of every batch; make batch_size a multiple of {world_size} (grad_accum keeps the "
                        "global batch)")
    if world_size > 1 and cfg.device.startswith("cuda:"):
        problems.append(f"train.device={cfg.device!r}: each process of a distributed run takes the GPU of its local "
                        "rank; use \"auto\" or \"cuda\"")
    if mp > 1:
        if isinstance(sparse, UltraMemV2Config):
            if sparse.dv % (sparse.cores * mp) or sparse.dp % mp:
                problems.append(f"train.memory_parallel={mp}: splits each of the {sparse.cores} value chunks "
                                f"(sparse.dv={sparse.dv}) and the pre-values (sparse.dp={sparse.dp}) into {mp} "
                                f"column blocks; make dv a multiple of {sparse.cores * mp} and dp of {mp}")
        elif isinstance(sparse, PKMConfig):
            if sparse.dv % mp:
                problems.append(f"train.memory_parallel={mp}: splits sparse.dv={sparse.dv} into {mp} column blocks; "
                                f"make dv a multiple of {mp}")
        else:
            what = f"the tables of a {sparse.kind} layer" if sparse else "a dense model's"
            problems.append(f"train.memory_parallel={mp}: only UltraMemV2 and PKM/Memory+ tables split by columns, "
                            f"not {what}; set memory_parallel = 1")
    return problems


def run_spec_from_dict(data: dict[str, Any], where: str = "run") -> RunSpec:
    """``{"model": {...} | "PRESET", "train": {...}, "data": "..."}`` → `RunSpec`, all problems at once."""
    problems = [f"{where}: {key}: unknown field; allowed: model, train, data"
                for key in data if key not in ("model", "train", "data")]
    if "model" not in data:
        problems.append(f"{where}: model: missing; give a preset name or a table of model fields")
    if not isinstance(data.get("data", ""), str):
        problems.append(f"{where}: data={data['data']!r}: expected a directory or \"builtin\"")
    train = data.get("train", {})
    if not isinstance(train, dict):
        problems.append(f"{where}: train: expected a table of training fields")
        train = {}
    train_kwargs = _typed_kwargs(TrainConfig, train, "train.", problems)
    model = data.get("model")
    model_cfg = None
    try:
        if isinstance(model, str):
            from umv2cli.model.presets import get_preset

            model_cfg = get_preset(model)
        elif isinstance(model, dict):
            model_cfg = config_from_dict(model, where=f"{where}: model")
        elif model is not None:
            problems.append(f"{where}: model: expected a preset name or a table of model fields")
    except UserError as e:
        problems += [p if p.startswith(where) else f"{where}: {p}" for p in e.problems]
    if problems:
        raise UserError(*[p if p.startswith(where) else f"{where}: {p}" for p in problems])
    try:
        return RunSpec(model=model_cfg, train=TrainConfig(**train_kwargs), data=data.get("data", "builtin"))
    except UserError as e:
        raise UserError(*[f"{where}: {p}" for p in e.problems]) from None


# ----------------------------------------------------------------------------------------------
# validation helpers and building from plain data


def _positive(obj: Any, *names: str) -> list[str]:
    prefix = "sparse." if hasattr(obj, "kind") else ""
    return [f"{prefix}{n}={getattr(obj, n)}: must be a positive integer"
            for n in names if getattr(obj, n) <= 0]


def _product_key_problems(cfg: "PKMConfig | PEERConfig", *more_positive: str) -> list[str]:
    """Checks shared by the product-key layers: two half-queries, top-k within one side's keys."""
    problems = _positive(cfg, "knum", "topm", "heads", "dk", *more_positive)
    if not problems:
        if cfg.dk % 2:
            problems.append(f"sparse.dk={cfg.dk}: must be even (two half-queries)")
        if cfg.topm > cfg.knum:
            problems.append(f"sparse.topm={cfg.topm}: exceeds knum={cfg.knum} sub-keys; lower topm or raise knum")
    return problems


def _raise(problems: list[str]) -> None:
    if problems:
        raise UserError(*problems)


def config_from_dict(data: dict[str, Any], where: str = "config") -> ModelConfig:
    """Build a `ModelConfig` from plain data, e.g. a parsed TOML file.

    A ``preset = "NAME"`` key starts from that preset; the other keys override its fields
    (``sparse`` fields one by one). All type and name problems are reported together, one line
    each, prefixed with `where`.
    """
    data = dict(data)
    if "preset" in data:
        from umv2cli.model.presets import get_preset

        base = get_preset(str(data.pop("preset"))).to_dict()
        over, base_sparse = data.get("sparse"), base["sparse"]
        if isinstance(over, dict) and base_sparse and over.get("kind", base_sparse["kind"]) == base_sparse["kind"]:
            merged = {**base_sparse, **over}
            if "k_rc" in merged and "k_rc" not in over:
                merged.pop("k_rc")  # re-derive the default min(topm, 128) from the new topm
            data["sparse"] = merged
        data = {**base, **data}
    problems: list[str] = []
    sparse = data.get("sparse")
    if isinstance(sparse, dict):
        kind = sparse.get("kind")
        if kind not in SPARSE_KINDS:
            problems.append(f"{where}: sparse.kind={kind!r}: must be one of {', '.join(SPARSE_KINDS)}")
        else:
            sparse_kwargs = _typed_kwargs(SPARSE_KINDS[kind], sparse, "sparse.", problems)
    elif sparse is not None:
        problems.append(f"{where}: sparse: expected a table with a 'kind' key, got {type(sparse).__name__}")
    kwargs = _typed_kwargs(ModelConfig, {k: v for k, v in data.items() if k != "sparse"}, "", problems)
    if problems:
        raise UserError(*[p if p.startswith(where) else f"{where}: {p}" for p in problems])
    try:
        sparse_cfg = SPARSE_KINDS[sparse["kind"]](**sparse_kwargs) if isinstance(sparse, dict) else None
        return ModelConfig(**kwargs, sparse=sparse_cfg)
    except UserError as e:
        raise UserError(*[f"{where}: {p}" for p in e.problems]) from None


def _typed_kwargs(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> dict[str, Any]:
    """Check names and types of `data` against the dataclass `cls`; collect problems."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "sparse"]
    out = {}
    for key, value in data.items():
        if key not in names:
            problems.append(f"{prefix}{key}: unknown field; allowed: {', '.join(names)}")
            continue
        ok, expected = _type_ok(value, hints[key])
        if not ok:
            problems.append(f"{prefix}{key}={value!r}: expected {expected}")
        else:
            out[key] = float(value) if expected == "a number" else value
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    problems += [f"{prefix}{n}: missing; set it" for n in required if n not in data]
    return out


def _type_ok(value: Any, hint: Any) -> tuple[bool, str]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in args, "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        checks = [_type_ok(value, a) for a in args]
        return any(ok for ok, _ in checks), " or ".join(e for _, e in checks)
    if hint is type(None):
        return value is None, "none"
    if hint is bool:
        return isinstance(value, bool), "true or false"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), "an integer"
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    if hint is str:
        return isinstance(value, str), "a string"
    raise TypeError(f"unsupported config type {hint!r}")


def read_table(path: Path) -> dict[str, Any]:
    """A TOML (or, by suffix, JSON) file's top-level table; one-line errors naming the file."""
    import json
    import tomllib

    if not path.exists():
        raise UserError(f"{path}: no such file; pass a .toml or .json file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; pass a .toml or .json file")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot parse ({str(e).splitlines()[0]}); fix the file's syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a table of fields at the top level")
    return data


def load_config(spec: str) -> ModelConfig:
    """A preset name, or a path to a TOML or JSON config file."""
    from umv2cli.model.presets import PRESETS, get_preset

    if spec in PRESETS:
        return get_preset(spec)
    if not Path(spec).exists():
        raise UserError(f"{spec}: neither a preset nor a file; see `umv2 model presets` for preset names")
    return config_from_dict(read_table(Path(spec)), where=spec)
