"""Every stage's configuration, stated once. Each field carries its option's default, help, choices and range check;
the command line (pipeline.cli) is derived from these dataclasses and the same checks guard library callers. No
torch here: the command starts fast and `--help` costs nothing."""

import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace

from pipeline.errors import DataError, OptionError
from storage.backends import BACKENDS
from storage.errors import CacheError
from storage.part import ID_CODECS, LOGPROB_CODECS, MAX_TOP_K
from storage.tables import TABLES as EXPORT_LAYOUTS

KINDS = ("fkl", "rkl", "akl", "jsd", "tvd", "sfkl", "srkl")  # the divergences of pipeline.losses
CROSS_KINDS = ("uld", "gold", "pkl", "alm")  # the cross-tokenizer losses of pipeline.cross_losses
# what train optimizes: SFT, a divergence, the on-policy policy gradient, or a cross-tokenizer loss
LOSSES = ("ce",) + KINDS + ("pg",) + CROSS_KINDS
TAIL_MODES = ("bucket", "renormalize")
DEFAULT_PART_SIZE = 256  # cache-teacher's default: a dataset split like it gets the same epoch plans
DTYPES = ("auto", "float32", "bfloat16", "float16")
TOP_K = 64  # cache-teacher's row width without top-p (--top-p 1)
TOP_P_WIDTH = 1024  # its widest row with --top-p: a real teacher keeps a fifth of its mass beyond 64 tokens
# cache-teacher's earlier default encodings, newest first: an existing cache that a command would have written with
# one (the options it leaves at their default taking that version's) is resumed, or hit, with it; new caches get
# CacheTeacherConfig's defaults
EARLIER_DEFAULT_ENCODINGS = {
    "0.2–0.3 (24 tail draws)": {"tail_draws": 24},
    "before 0.2 (top-k 64, float16)": {
        "top_k": None,
        "top_p": None,
        "tail_draws": 0,
        "ids": "plain",
        "logprob_dtype": "float16",
    },
}
ENCODING_OPTIONS = (
    *("top_k", "top_p", "tail_draws", "ids", "logprob_dtype", "min_k"),
    *("sketch_rank", "sketch_bits", "sketch_positions"),
)


# -- range checks: a predicate and what it asks of the value


@dataclass(frozen=True)
class Check:
    ok: typing.Callable[[typing.Any], bool]
    wants: str


def at_least(n) -> Check:
    return Check(lambda v: v >= n, f"must be at least {n}")


def within(lo, hi) -> Check:
    return Check(lambda v: lo <= v <= hi, f"must lie in [{lo}, {hi}]")


FRACTION = within(0, 1)
FINITE_POSITIVE = Check(lambda v: math.isfinite(v) and v > 0, "must be finite and positive")
FINITE_NON_NEGATIVE = Check(lambda v: math.isfinite(v) and v >= 0, "must be finite and at least 0")


def option(default=MISSING, help: str = "", *, choices=None, check: Check | None = None, flag=None, cli=True, **meta):
    """A config field with its option's help, choices and range check. `flag` names the option when it differs from
    the field (e.g. TeacherConfig.model is --teacher); cli=False keeps a field off the command line."""
    meta = dict(help=help, choices=choices, check=check, flag=flag, cli=cli, **meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def group(cls):
    """A sub-config field: its options sit beside the parent's on the command line."""
    return field(default_factory=cls, metadata={"group": True})


def options(cls):
    """A stage's config: a dataclass whose fields are normalized (a field's `normalize` or `parse`: a list to a
    tuple, "0/4" to (0, 4)) and checked (choices, range checks) on construction, then checked as a whole by its own
    `validate`, if it has one."""

    def __post_init__(self):
        for f in fields(self):
            normalize = f.metadata.get("normalize") or f.metadata.get("parse")
            if normalize:
                setattr(self, f.name, normalize(getattr(self, f.name)))
        check(self)
        join_gguf_file(self)
        if hasattr(self, "validate"):
            self.validate()

    cls.__post_init__ = __post_init__
    return dataclass(cls)


def gguf_file_option():
    """--gguf-file: the .gguf file inside the folder or hub repository that the config's model field (its option
    marked `gguf=True`) names; on construction the two join into one model name, FOLDER/NAME.gguf."""
    return option(None, "the .gguf file to load from the model's folder or hub repository (dequantized to float)")


def join_gguf_file(cfg) -> None:
    name = getattr(cfg, "gguf_file", None)
    if name is None:
        return
    if not name.endswith(".gguf") or "/" in name:
        raise OptionError(f"--gguf-file {name!r} is not a .gguf file name; give the file's name inside the folder")
    model = next(f for f in fields(cfg) if f.metadata.get("gguf"))
    setattr(cfg, model.name, f"{str(getattr(cfg, model.name)).rstrip('/')}/{name}")
    cfg.gguf_file = None  # the model's name now carries it


def flag_of(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def key_of(f) -> str:
    """The field's name in flat option values (the command line's parameter, a run's settings): its flag's."""
    return flag_of(f)[2:].replace("-", "_")


def check(cfg) -> None:
    """Each option field's choices and range check (a tuple's every value); None means not given."""
    for f in fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        for v in value if isinstance(value, tuple) else (value,):
            if v is None or isinstance(v, bool):
                continue
            if meta.get("choices") and v not in meta["choices"]:
                raise OptionError(f"unknown {flag_of(f)} {v!r}; choose one of {', '.join(meta['choices'])}")
            if meta.get("check") and not meta["check"].ok(v):
                raise OptionError(f"{flag_of(f)} {v} {meta['check'].wants}")


def option_fields(cls) -> list:
    """The command line's fields of `cls`, sub-configs' fields in place (in declaration order)."""
    out = []
    for f in fields(cls):
        if f.metadata.get("group"):
            out += option_fields(f.default_factory)
        elif f.metadata.get("cli", False):
            out.append(f)
    return out


def value_type(f):
    """(element type, repeatable) of a field's annotation: int | None → (int, False), tuple[float, ...] → (float,
    True)."""
    t = f.type
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    if typing.get_origin(t) is tuple:
        return typing.get_args(t)[0], True
    return t, False


def build(cls, values: dict):
    """A `cls` from flat option values keyed by flag name (key_of), sub-configs filled from the same dict; keys no
    field takes are an error (a typo would otherwise be ignored)."""
    unknown = set(values) - _names(cls)
    if unknown:
        raise TypeError(f"{cls.__name__} has no option {', '.join(sorted(unknown))}")
    return _build(cls, values)


def _build(cls, values: dict):
    kw = {}
    for f in fields(cls):
        if f.metadata.get("group"):
            kw[f.name] = _build(f.default_factory, values)
        elif key_of(f) in values:
            kw[f.name] = values[key_of(f)]
    return cls(**kw)


def _names(cls) -> set:
    return {n for f in fields(cls) for n in (_names(f.default_factory) if f.metadata.get("group") else {key_of(f)})}


def flat(cfg) -> dict:
    """The inverse of build: every field by key_of, sub-configs flattened in (nested dataclasses such as DataConfig
    kept as dicts)."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if f.metadata.get("group"):
            out |= flat(v)
        else:
            out[key_of(f)] = {g.name: getattr(v, g.name) for g in fields(v)} if is_dataclass(v) else v
    return out


def as_tuple(value) -> tuple:
    """A repeatable option's values: a tuple, from a tuple, a list, one value or None."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def parse_shard(value) -> tuple[int, int] | None:
    if value is None or isinstance(value, tuple):
        return value
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise OptionError(f"--shard {value!r} is not of the form I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise OptionError(f"--shard {value} is not of the form I/N with 0 <= I < N")
    return (i, n)


def parse_layers(value) -> tuple[int, ...] | None:
    if value is None or isinstance(value, tuple):
        return value
    try:
        return tuple(int(x) for x in str(value).split(","))
    except ValueError:
        raise OptionError(f"--layers {value!r} is not a comma-separated list of layer numbers, e.g. 0,6,12") from None


# -- the data every stage reads


@options
class DataConfig:
    source: str = option(MISSING, "jsonl/json/parquet/csv/arrow file, saved dataset folder, or hub name", flag="--data")
    split: str = option("train")
    prompt_field: str | None = option(None, "instruction data: the prompt's column")
    response_field: str | None = option(None, "instruction data: the response's column")
    text_field: str | None = option(None, "plain text: the text's column")
    text_end: str = option(
        "eos",
        "plain text: the token appended to each text: eos (the tokenizer's EOS, which for an instruct model ends a "
        "turn), none, or a token of the vocabulary such as <|endoftext|>",
    )
    max_length: int = option(1024, "tokens per sample; longer ones are truncated", check=at_least(2))
    limit: int | None = option(None, "use only the first N samples", check=at_least(1))
    response_ids_field: str | None = option(None, "generated rows: the response's token ids, used as they are")
    behavior_field: str | None = option(None, "generated rows: the sampler's log-prob of each response token")

    def validate(self):
        instruction = self.prompt_field is not None or self.response_field is not None
        if instruction == (self.text_field is not None):
            raise DataError(
                "give either --prompt-field and --response-field (instruction data) or --text-field (plain text)"
            )
        if instruction and (self.prompt_field is None or self.response_field is None):
            raise DataError("instruction data needs both --prompt-field and --response-field")
        if (self.response_ids_field or self.behavior_field) and not instruction:
            raise DataError("--response-ids-field and --behavior-field belong to instruction data (generated rows)")
        if self.behavior_field and not self.response_ids_field:
            raise DataError("--behavior-field needs --response-ids-field: its log-probs are those of the stored tokens")


# -- cache-teacher


@options
class CacheTeacherConfig:
    teacher: str = option(MISSING, "Hugging Face causal LM: local path, hub name or .gguf file", gguf=True)
    gguf_file: str | None = gguf_file_option()
    data: DataConfig | None = option(None, cli=False)
    out: str | None = option(None, "cache folder")
    cache_root: str | None = option(None, "folder of caches named by cache key (instead of --out)")
    # the defaults: the all-loss point of the real teacher's frontier (64 B/pos at V = 49152, README "Benchmarks")
    top_k: int | None = option(
        None, f"largest row width [default: {TOP_P_WIDTH}, or {TOP_K} with --top-p 1; at most the vocabulary]"
    )
    top_p: float | None = option(
        0.5,
        "keep per row the smallest teacher-sorted prefix with this mass (ragged rows); 1: every row --top-k wide",
        normalize=lambda p: None if p == 1 else p,
    )
    min_k: int = option(1, "narrowest row with --top-p")
    ids: str = option("bitpack", "token id encoding: narrowest integer, or ceil(log2 V) bits", choices=ID_CODECS)
    logprob_dtype: str = option(
        "q8",
        "float16/float32, or qB: B-bit power quantization (rows still sum to 1 with the exact tail)",
        choices=tuple(LOGPROB_CODECS),
    )
    tail_draws: int = option(16, "tokens drawn per row from the teacher's tail (Random-Sampling KD); 0: none")
    seed: int = option(0, "seed of the tail draws")
    sketch_rank: int = option(
        0,
        "store the teacher's final hidden state projected on this many principal directions (the tail's shape "
        "for rkl, akl, jsd, tvd); 0: none",
    )
    sketch_bits: int = option(4, "bits per sketch coefficient (2 to 8)")
    sketch_positions: int = option(4096, "positions the sketch's directions are fitted on", check=at_least(16))
    sketch_from: str | None = option(
        None,
        "take the sketch of this cache of the same teacher instead of fitting one (caches mixed in training "
        "need one sketch: on-policy rounds take the fixed data's)",
    )
    temperatures: tuple[float, ...] = option(
        (1.0,), "repeatable", flag="--temperature", check=FINITE_POSITIVE, normalize=as_tuple
    )
    format: str = option("zarr", "storage backend: Zarr v3 or Arrow IPC", choices=tuple(BACKENDS))
    batch_size: int = option(8, check=at_least(1))
    batch_tokens: int | None = option(
        None, "padded-token budget per batch (instead of --batch-size)", check=at_least(1)
    )
    dtype: str = option("auto", "auto: bf16 on GPU, float32 on CPU", choices=DTYPES)
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    tp: int = option(
        1, "tensor-parallel size under torchrun: WORLD_SIZE / TP groups each fill a shard", check=at_least(1)
    )
    device_map: str | None = option(None, "spread the teacher over this process's devices: auto, balanced, sequential")
    max_memory: str | None = option(None, "with --device-map: per-device limits, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    shard: tuple[int, int] | None = option(None, "I/N: fill only parts p with p mod N = I", parse=parse_shard)
    part_size: int = option(DEFAULT_PART_SIZE, "samples per part", check=at_least(1))
    num_proc: int = option(1, "tokenizer processes", check=at_least(1))
    overwrite: bool = option(False, "replace a different cache at --out (the old one stays until the new one is whole)")
    strict: bool = option(False, "abort on non-finite teacher logits instead of skipping the sample")
    trust_remote_code: bool = option(False, "run the model's own code from its folder or hub repository")
    chunk_bytes: int = option(1 << 29, cli=False)
    progress: bool = option(True, cli=False)
    # the options the command line gave (the command fills it): one stated at its default value is not left to an
    # earlier version's default (earlier_defaults)
    stated: tuple[str, ...] = option((), cli=False)

    def validate(self):
        if len(set(self.temperatures)) != len(self.temperatures):
            raise OptionError(f"temperatures repeat: {self.temperatures}")
        if self.out is None and self.cache_root is None:
            raise OptionError("give --out or --cache-root")
        from storage import check_encoding_options

        check_encoding_options(
            k=self.width(MAX_TOP_K), top_p=self.top_p, min_k=self.min_k, ids=self.ids, logprobs=self.logprob_dtype,
            draws=self.tail_draws, sketch_rank=self.sketch_rank, sketch_bits=self.sketch_bits,
        )  # fmt: skip

    def earlier_defaults(self) -> dict[str, "CacheTeacherConfig"]:
        """This command as each earlier version would have run it: the encoding options it leaves at their default
        take that version's default (only those that differ from this one and make an encoding beside the options
        stated: RS-KD's --top-p 0 --min-k 0 with no draws makes none). An option is stated when the command line
        gave it (`stated`) or its value is not the default."""
        defaults = self.defaults()
        unstated = [n for n in ENCODING_OPTIONS if n not in self.stated and getattr(self, n) == defaults[n]]
        out = {}
        for when, encoding in EARLIER_DEFAULT_ENCODINGS.items():
            try:
                earlier = replace(self, **{k: v for k, v in encoding.items() if k in unstated})
            except CacheError:
                continue
            if earlier != self:
                out[when] = earlier
        return out

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default for f in fields(cls)}

    @classmethod
    def default_flags(cls) -> str:
        """Today's default encoding as cache-teacher's flags."""
        names = ("top_p", "tail_draws", "ids", "logprob_dtype")
        return " ".join(f"--{n.replace('_', '-')} {cls.defaults()[n]}" for n in names)

    def width(self, vocab_size: int) -> int:
        """The widest row: --top-k, or its default for this vocabulary."""
        return self.top_k or min(vocab_size, TOP_K if self.top_p is None else TOP_P_WIDTH)


# -- train, in groups: what it optimizes, how, on which batches, from which teacher, what it evaluates, at what scale


@options
class LossConfig:
    kind: str = option(
        "fkl",
        "ce, fkl, rkl, akl, jsd, tvd, sfkl, srkl, pg (reverse-KL policy gradient on generated tokens), or for a "
        "student with another tokenizer uld, gold, pkl or alm",
        choices=LOSSES,
        flag="--loss",
    )
    kd_ratio: float | None = option(None, "weight of KD in (1 - r)·CE + r·KD; default 1 (0 for ce)", check=FRACTION)
    mu: float = option(0.5, "AKL head mass", check=FRACTION)
    beta: float = option(0.5, "JSD mixture weight", check=FRACTION)
    alpha: float = option(0.1, "skew KL weight", check=FRACTION)
    temperature: float = option(1.0, "must be one the cache holds", check=FINITE_POSITIVE)
    alm_tau: float = option(
        1.0, "alm: the chunk likelihoods' temperature τ (τ·binary KL of likelihoods^(1/τ))", check=FINITE_POSITIVE
    )
    tail: str = option(
        "bucket",
        "the teacher's tail as one exact bin, or dropped with the head renormalized (the peers' default)",
        choices=TAIL_MODES,
    )
    allow_offpolicy_pg: bool = option(
        False, "--loss pg on a cache of data the student did not generate (its gradient is then biased)"
    )

    def validate(self):
        if self.kd_ratio is None:
            self.kd_ratio = 0.0 if self.kind == "ce" else 1.0

    @property
    def params(self) -> dict:
        """The divergence's parameters, as pipeline.losses takes them."""
        return {
            "mu": self.mu,
            "beta": self.beta,
            "alpha": self.alpha,
            "temperature": self.temperature,
            "alm_tau": self.alm_tau,
            "tail": self.tail,
        }


@options
class OptimizerConfig:
    lr: float = option(
        2e-5, "peak learning rate (a pretrained student's; the demo sets its own)", check=FINITE_POSITIVE
    )
    min_lr_ratio: float = option(0.1, "cosine floor as a fraction of --lr", check=within(0, 1))
    warmup_steps: int = option(10, check=at_least(0))
    weight_decay: float = option(0.01, check=FINITE_NON_NEGATIVE)
    grad_clip: float = option(1.0, "gradient norm clip; 0: none", check=FINITE_NON_NEGATIVE)
    max_nonfinite: int = option(10, "abort after this many skipped steps", check=at_least(0))


@options
class BatchConfig:
    batch_size: int = option(8, "samples per micro-batch, all ranks together", check=at_least(1))
    batch_tokens: int | None = option(
        None, "padded-token budget per micro-batch (instead of --batch-size)", check=at_least(1)
    )
    grad_accum: int = option(1, check=at_least(1))
    packing: bool = option(False, "pack samples into rows of --pack-length tokens, no padding")
    pack_length: int = option(2048, check=at_least(2))
    part_size: int = option(
        DEFAULT_PART_SIZE, "with --data: the cache-teacher part size whose epoch plan to follow", check=at_least(1)
    )
    shuffle_window: int = option(4, cli=False)
    num_workers: int = option(0, check=at_least(0))


@options
class TeacherConfig:
    cache: tuple[str, ...] = option(
        (), "teacher cache to distill from; repeat to mix several (with --mix)", normalize=as_tuple
    )
    mix: tuple[float, ...] = option(
        (), "share of each --cache per micro-batch; with two caches one value: the second's share λ (GKD)",
        check=FINITE_NON_NEGATIVE, normalize=as_tuple,
    )  # fmt: skip
    model: str | None = option(
        None, "run this teacher online over --data instead of a cache (the fidelity reference)", flag="--teacher"
    )
    online_topk: int | None = option(
        None, "with --teacher: top-k + exact tail computed on the fly (default: dense)", check=at_least(1)
    )
    device_map: str | None = option(
        None, "with --teacher: spread it over devices (auto), e.g. beside the student", flag="--teacher-device-map"
    )
    allow_tokenizer_mismatch: bool = option(
        False, "distill although the teacher's tokenizer differs from the student's"
    )
    teacher_tokenizer: str | None = option(
        None, "--loss gold or pkl: the teacher's tokenizer [default: the cache's teacher]"
    )

    def validate(self):
        n = len(self.cache)
        if self.mix and not (len(self.mix) == n or (n == 2 and len(self.mix) == 1)):
            raise OptionError(
                f"--mix takes one share per --cache (or, with two caches, the second's share λ); "
                f"got {len(self.mix)} for {n}"
            )
        if self.mix and n < 2:
            raise OptionError(
                "--mix shares out micro-batches among two or more --cache; with one cache it would be "
                "ignored: drop --mix or add the other --cache"
            )
        if n > 1 and not self.mix:
            raise OptionError(f"{n} caches need --mix: the share of each (GKD's λ for the second of two)")
        if self.cache and self.model:
            raise OptionError("give --cache (a cached teacher) or --teacher (run online), not both")


@options
class EvaluationConfig:
    eval_cache: str | None = option(None, "held-out teacher cache for eval loss")
    eval_data: DataConfig | None = option(None, cli=False)
    eval_every: int = option(0, "held-out scores every N steps; 0: none", check=at_least(0))
    eval_samples: int = option(256, check=at_least(1))


@options
class ScaleConfig:
    fsdp: bool = option(False, "shard the student with FSDP2 (under torchrun)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    attn_implementation: str | None = option(None, "transformers attention: sdpa, eager, flash_attention_2, …")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    dtype: str = option("auto", "auto: bf16 on GPU, float32 on CPU", choices=DTYPES)
    num_proc: int = option(1, "tokenizer processes for --data", check=at_least(1))


@options
class TrainConfig:
    student: str = option(
        MISSING, "Hugging Face model (path, hub name or .gguf file), or a config with --init-from-config", gguf=True
    )
    out: str = option(MISSING, "run folder")
    gguf_file: str | None = gguf_file_option()
    data: DataConfig | None = option(None, cli=False)
    init_from_config: bool = option(False, "initialize the student from --student's config, not its weights")
    tokenizer: str | None = option(None, "tokenizer for --init-from-config")
    epochs: int = option(1, check=at_least(1))
    max_steps: int | None = option(None, "optimizer steps (overrides --epochs)", check=at_least(1))
    seed: int = option(0)
    save_every: int = option(0, "checkpoint interval in steps", check=at_least(0))
    log_every: int = option(10, check=at_least(1))
    resume: bool = option(False, "continue from the run's latest checkpoint")
    overwrite: bool = option(False, "replace another run in --out (its checkpoints, model and metrics)")
    trust_remote_code: bool = option(False, "run the model's own code from its folder or hub repository")
    progress: bool = option(True, cli=False)
    loss: LossConfig = group(LossConfig)
    optimizer: OptimizerConfig = group(OptimizerConfig)
    batches: BatchConfig = group(BatchConfig)
    teacher: TeacherConfig = group(TeacherConfig)
    evaluation: EvaluationConfig = group(EvaluationConfig)
    scale: ScaleConfig = group(ScaleConfig)

    @classmethod
    def of(cls, **values) -> "TrainConfig":
        """A TrainConfig from flat option values named as on the command line: of(loss="akl", lr=3e-3, cache=…)."""
        return build(cls, values)

    def validate(self):
        if self.teacher.model and self.data is None:
            raise OptionError("--teacher runs the teacher online over --data; pass --data and its fields")
        if self.loss.kind == "ce" and self.data is None and not self.teacher.cache:
            raise OptionError("--loss ce needs --data (or --cache)")
        if self.loss.kind != "ce" and not self.teacher.cache and self.teacher.model is None:
            raise OptionError(
                f"--loss {self.loss.kind} distills from a teacher: pass --cache, or --teacher with --data"
            )
        if self.init_from_config and not self.tokenizer:
            raise OptionError("--init-from-config needs --tokenizer")
        if self.loss.kind in CROSS_KINDS and not self.teacher.cache:
            raise OptionError(
                f"--loss {self.loss.kind} aligns a cache's text to the student's tokens: pass --cache (a teacher "
                "running online is not supported for it)"
            )
        if self.teacher.teacher_tokenizer and self.loss.kind not in ("gold", "pkl"):
            raise OptionError(
                f"--teacher-tokenizer maps the teacher's vocabulary for --loss gold or pkl; --loss {self.loss.kind} "
                "does not use it: drop it"
            )
        if self.loss.alm_tau != 1.0 and self.loss.kind != "alm":
            raise OptionError(f"--alm-tau is alm's temperature; --loss {self.loss.kind} does not use it: drop it")


# -- evaluate, generate, report and the data preparation commands


@options
class EvalConfig:
    model: str = option(MISSING, "model folder (e.g. RUN/final), hub name or .gguf file", gguf=True)
    out: str = option(MISSING, "metrics JSON")
    gguf_file: str | None = gguf_file_option()
    data: DataConfig | None = option(None, cli=False)
    teacher_cache: str | None = option(None, "cache of this split, for KL to the teacher (top-k + tail bucket)")
    teacher: str | None = option(None, "the teacher model, for the exact full-vocabulary KL on this split")
    answer_field: str | None = option("answer", "column with a checkable answer, if any")
    max_new_tokens: int = option(48, check=at_least(1))
    batch_size: int = option(16, check=at_least(1))
    generate: bool = option(True, "greedy generations for ROUGE-L and exact match (--no-generate: NLL and KL only)")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    dtype: str = option("auto", "auto: bf16 on GPU, float32 on CPU", choices=DTYPES)
    label: str | None = option(None, "row name in the report (default: the run folder's name)")
    run: str | None = option(None, "training run folder, for learning curves in the report")
    round: int | None = option(None, "on-policy round of this model, for the per-round plot", check=at_least(0))
    trust_remote_code: bool = option(False, "run the model's own code from its folder or hub repository")
    progress: bool = option(True, cli=False)


@options
class GenerateConfig:
    model: str = option(MISSING, "the student that samples (a folder, e.g. RUN/final)", gguf=True)
    source: str = option(MISSING, "prompts: any dataset --data accepts", flag="--data")
    prompt_field: str = option(MISSING, "the prompt's column")
    out: str = option(MISSING, "JSONL of rows: the prompt row + response, token ids, log-probs")
    gguf_file: str | None = gguf_file_option()
    split: str = option("train")
    limit: int | None = option(None, "use only the first N prompts", check=at_least(1))
    max_prompt_length: int = option(1024, check=at_least(1))
    samples_per_prompt: int = option(1, check=at_least(1))
    temperature: float = option(1.0, "0: greedy", check=FINITE_NON_NEGATIVE)
    top_p: float = option(1.0, check=Check(lambda v: 0 < v <= 1, "must lie in (0, 1]"))
    top_k: int = option(0, "0: no top-k filter", check=at_least(0))
    max_new_tokens: int = option(128, check=at_least(1))
    seed: int = option(0)
    round: int = option(0, "recorded in every row", check=at_least(0))
    batch_size: int = option(16, check=at_least(1))
    teacher: str | None = option(None, "with --alpha: sample each token from α·p_T + (1−α)·q_S (MiniLLM)")
    alpha: float = option(0.0, check=within(0, 1))
    response_field: str = option("response")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    dtype: str = option("auto", "auto: bf16 on GPU, float32 on CPU", choices=DTYPES)
    trust_remote_code: bool = option(False, "run the model's own code from its folder or hub repository")
    progress: bool = option(True, cli=False)

    def validate(self):
        if (self.alpha > 0) != (self.teacher is not None):
            raise OptionError("teacher-mixed sampling takes --teacher with --alpha in (0, 1]; plain sampling neither")


@options
class ReportConfig:
    evals: list[str] = option(MISSING, cli=False)
    out: str = option("results/report.md")
    title: str = option("Distillation report")


@options
class DemoDataConfig:
    out: str = option(MISSING)
    train_size: int = option(2000, check=at_least(1))
    test_size: int = option(200, check=at_least(1))
    vocab_size: int = option(600, check=at_least(1))
    seed: int = option(0)
    pretrain_size: int = option(
        0, "also write pretrain.jsonl: this many chunks of the Python standard library's sources", check=at_least(0)
    )
    pretrain_chars: int = option(600, check=at_least(1))


@options
class PrepareDataConfig:
    source: str = option(MISSING, flag="--data")
    out: str = option(MISSING)
    prompt_field: str = option("instruction")
    response_field: str = option("response")
    context_field: str | None = option(None, "appended to the prompt when present (dolly's `context`)")
    split: str = option("train")
    test_size: int = option(500, check=at_least(0))
    limit: int | None = option(None, check=at_least(1))
    seed: int = option(0)


@options
class DocstringDataConfig:
    """prepare-docstrings: instruction pairs from the standard library's documentation."""

    out: str = option(MISSING, "folder for train.jsonl and test.jsonl")
    test_size: int = option(100, "held-out pairs (at most a fifth of all)", check=at_least(1))
    limit: int | None = option(None, "use only this many pairs in all", check=at_least(2))
    max_chars: int = option(400, "longest answer (a docstring's first paragraph), in characters", check=at_least(40))
    seed: int = option(0, "shuffle before the split")


@options
class ModelConfig:
    """init-model: a freshly initialized small causal LM with a tokenizer (for the offline demo)."""

    out: str = option(MISSING, "model folder")
    tokenizer: str = option(MISSING, "tokenizer folder (its vocabulary sizes the model)")
    arch: str = option("llama", choices=("gpt2", "llama"))
    layers: int = option(2, check=at_least(1))
    width: int = option(64, check=at_least(1))
    heads: int = option(2, check=at_least(1))
    seed: int = option(0)


@options
class ExportModelConfig:
    """export-model: a model that loads slowly (a .gguf file, dequantized on every load) saved once as safetensors."""

    model: str = option(MISSING, "a .gguf file, or any model the stages load", cli=False, gguf=True)
    out: str = option(MISSING, "a new folder for the copy", cli=False)
    gguf_file: str | None = gguf_file_option()
    trust_remote_code: bool = option(False, "run the model's own code from its folder or hub repository")


@options
class ExportConfig:
    """export: a cache as Parquet tables of one row per sample, a file per part (datasets, Polars, DuckDB, axolotl)."""

    cache: str = option(MISSING, "the cache", cli=False)
    out: str = option(
        MISSING, "a folder for the tables (an unfinished export of the same cache there is resumed)", cli=False
    )
    to: str = option(
        "parquet",
        "parquet: every field the cache decodes; axolotl: axolotl's KD dataset columns (the head only, which axolotl "
        "renormalizes)",
        choices=tuple(EXPORT_LAYOUTS),
    )
    temperature: float | None = option(None, "which of the cache's temperatures [default: its first]")
    progress: bool = option(True, cli=False)


@options
class InitStudentConfig:
    """init-student: a depth-pruned copy of a model (Minitron's depth pruning): the kept layers, the embeddings, the
    final norm and the head."""

    teacher: str = option(MISSING, "the model to prune: a folder, hub name or .gguf file", flag="--from", gguf=True)
    layers: tuple[int, ...] = option(
        MISSING, "the layers to keep, ascending, e.g. 0,6,12,18,24,29", parse=parse_layers, check=at_least(0)
    )
    out: str = option(MISSING, "a new folder for the student")
    gguf_file: str | None = gguf_file_option()
    trust_remote_code: bool = option(False, "run the model's own code from its folder or hub repository")

    def validate(self):
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise OptionError(f"--layers {','.join(map(str, self.layers))} must be distinct and ascending, e.g. 0,6,12")
