"""Loading Hugging Face causal LMs (a student; a teacher on one device, spread by a device map or sharded over a
tensor-parallel group) and tokenizers, their fingerprints, and logits at chosen positions only."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch

from pipeline import compat
from pipeline.errors import ModelError, OptionError

VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "_commit_hash",
    "architectures",
    "use_cache",
}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ModelError(f"unknown --dtype {dtype!r}; choose auto, {', '.join(table)}")
    return table[dtype]


def check_exists(name) -> None:
    name = str(name)
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise ModelError(f"model path {name} does not exist")


def located(name) -> tuple[str, dict]:
    """(what from_pretrained loads, its extra arguments) for a model name: a hub name, a folder, or a `.gguf` file,
    which transformers' GGUF reader loads from its folder, dequantized to float (package gguf). A .gguf name that
    is no local path, OWNER/REPO/FILE.gguf, is that file of a hub repository (as --gguf-file joins it)."""
    name = str(name)
    check_exists(name)
    if not name.endswith(".gguf"):
        return name, {}
    path = Path(name).expanduser()
    on_hub = not path.exists() and not name.startswith(("/", ".", "~")) and name.count("/") == 2
    if not path.is_file() and not on_hub:
        raise ModelError(f"{name} is not a GGUF file")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"loading {path.name} needs the gguf package: pip install 'distill-cache[gguf]'")
    return str(path.parent), {"gguf_file": path.name}


def load_config(name, trust_remote_code: bool = False):
    from transformers import AutoConfig

    where, extra = located(name)
    with _loading("a model config", name):
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)


@contextlib.contextmanager
def _loading(what: str, name):
    """transformers' loading errors as one line naming the path (a folder without config.json, a missing file)."""
    try:
        yield
    except Exception as e:
        raise ModelError(
            f"cannot load {what} from {name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    where, extra = located(name)
    with _loading("a tokenizer", name):
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False, **kwargs):
    from transformers import AutoModelForCausalLM

    where, extra = located(name)
    with _loading("a causal LM", name):
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, trust_remote_code=trust_remote_code, **extra, **kwargs
        )
    return model.to(device)


def load_student(
    name: str,
    device: torch.device,
    *,
    tokenizer: str | None = None,
    init_from_config: bool = False,
    seed: int = 0,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) of a student in float32: its weights, or freshly initialized from its config (seeded)."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tokenizer or name, trust_remote_code)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if not init_from_config:
        return load_model(name, torch.float32, device, trust_remote_code, **extra), tok
    torch.manual_seed(seed)
    config = load_config(name, trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code, **extra)
    return model.to(device), tok


def load_teacher(
    name: str,
    dtype: torch.dtype,
    device: torch.device,
    *,
    tp: int = 1,
    device_map: str | None = None,
    max_memory: str | None = None,
    trust_remote_code: bool = False,
):
    """A teacher in eval mode: sharded over its TP group, spread by a device map, or on one device."""
    from transformers import AutoModelForCausalLM

    if tp > 1 and device_map:
        raise OptionError("--tp and --device-map are exclusive: shard across processes or spread one process, not both")
    if tp == 1 and not device_map:
        return load_model(name, dtype, device, trust_remote_code).eval()
    config = load_config(name, trust_remote_code)
    where, extra = located(name)
    if tp > 1:
        check_tensor_parallel(config, tp, name)
        kwargs = compat.tensor_parallel_kwargs(tp)
    else:
        kwargs = {"device_map": device_map, "max_memory": parse_max_memory(max_memory)}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, trust_remote_code=trust_remote_code, **extra, **kwargs
        )
    except (ValueError, RuntimeError, OSError) as e:
        raise ModelError(
            f"cannot load {name!r} with {'--tp ' + str(tp) if tp > 1 else '--device-map'}: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    return model.eval()


def decoder_layers(model) -> tuple[torch.nn.Module, str]:
    """(parent, attribute name) of the model's stack of decoder layers: the ModuleList as long as its config says."""
    n = compat.text_config(model.config).num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            parent, _, attribute = name.rpartition(".")
            return model.get_submodule(parent), attribute
    raise ModelError(f"cannot find the {n} decoder layers of {type(model).__name__} to prune")


def depth_pruned(model, keep: tuple[int, ...]):
    """The model with only its decoder layers `keep`, in order and renumbered; embeddings, final norm and head as they
    were (Minitron's depth pruning). In place; returns the model."""
    text = compat.text_config(model.config)
    check_layers(keep, text.num_hidden_layers)
    parent, attribute = decoder_layers(model)
    kept = torch.nn.ModuleList(getattr(parent, attribute)[i] for i in keep)
    for new, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):  # the KV cache's slot
                module.layer_idx = new
    setattr(parent, attribute, kept)
    text.num_hidden_layers = len(keep)
    if getattr(text, "layer_types", None):
        text.layer_types = [text.layer_types[i] for i in keep]
    return model


def check_layers(keep: tuple[int, ...], n: int) -> None:
    outside = [i for i in keep if not 0 <= i < n]
    if outside:
        raise OptionError(f"--layers: layer {outside[0]} is outside the model's {n} layers, 0 to {n - 1}")


def without_gguf(model):
    """A model loaded from a .gguf file (dequantized) that saves as a plain float checkpoint."""
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is not None and dict(quantization).get("quant_method") == "gguf":
        del model.config.quantization_config
        model.hf_quantizer = None
    return model


def check_tensor_parallel(config, tp: int, name: str) -> None:
    """One-line refusals for models transformers cannot shard, or a TP size that does not divide the heads."""
    text = compat.text_config(config)
    if not getattr(text, "base_model_tp_plan", None):
        raise OptionError(
            f"{name} ({config.model_type}) has no tensor-parallel plan in transformers; use "
            "--device-map auto, or a single device"
        )
    heads = getattr(text, "num_attention_heads", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    for what, n in (("attention heads", heads), ("key/value heads", kv)):
        if n is not None and n % tp:
            raise OptionError(f"--tp {tp} does not divide the teacher's {n} {what}; choose a TP size that divides {kv}")


def parse_max_memory(text: str | None) -> dict | None:
    """'0=70GiB,1=70GiB,cpu=200GiB' → {0: '70GiB', 1: '70GiB', 'cpu': '200GiB'}."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise OptionError(f"--max-memory {text!r}: each entry is DEVICE=SIZE, e.g. 0=70GiB,cpu=200GiB")
        out[int(key) if key.strip().isdigit() else key.strip()] = value.strip()
    return out


def config_sha256(config) -> str:
    d = {k: v for k, v in config.to_dict().items() if k not in VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def model_folder(name: str) -> Path | None:
    if Path(name).is_dir():
        return Path(name)
    try:
        from transformers.utils import cached_file

        return Path(cached_file(name, "config.json", local_files_only=True)).parent
    except Exception:
        return None


def _gguf_path(name: str) -> Path | None:
    """The local file a .gguf name means: the path itself, or a hub repository's file in the local hub cache."""
    if Path(name).is_file():
        return Path(name)
    try:
        from transformers.utils import cached_file

        return Path(cached_file(*name.rsplit("/", 1), local_files_only=True))
    except Exception:
        return None


def weights_fingerprint(name: str) -> str:
    """sha256 over each weight file's name, size and first and last MiB: cheap enough for a 140 GB checkpoint,
    and any re-save, fine-tune or conversion changes it. A .gguf model is that one file."""
    if str(name).endswith(".gguf") and (gguf := _gguf_path(str(name))) is not None:
        files = [gguf]
    elif (folder := model_folder(name)) is not None:
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    else:
        return "unknown"
    h = hashlib.sha256()
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()


def tokenizer_fingerprint(tok) -> str:
    d = {
        "vocab": sorted(tok.get_vocab().items()),
        "special": {k: str(v) for k, v in tok.special_tokens_map.items()},
        "chat_template": getattr(tok, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def output_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_vocab(model, tok, who: str) -> int:
    """The softmax size: the tokenizer's vocabulary, which the model's lm_head must cover."""
    v = len(tok)
    if v > output_size(model):
        raise ModelError(
            f"the {who} tokenizer has {v} tokens but its lm_head has {output_size(model)} outputs; "
            "use the tokenizer that belongs to the model"
        )
    return v


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value, gathered when it is sharded (a DTensor under tensor parallelism)."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class PositionLogits(torch.nn.Module):
    """Logits only where they are needed: the base model's hidden states at chosen (row, column) positions,
    through the lm_head, restricted to the real vocabulary. On first use it is checked against the model's own
    forward; a model with extra logit processing (soft-capping, scaling) that breaks the match falls back to
    gathering the full forward's logits."""

    def __init__(self, model, vocab_size: int):
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size
        self.fast = None

    def hidden_rows(self, input_ids, attention_mask, rows, cols, position_ids=None):
        """[P, H] hidden states (or [P, V'] logits on the fallback path) at the given positions. Packed rows pass
        position_ids that restart at each sample and no attention mask (transformers then masks across samples)."""
        if self.fast is None:
            self.fast = self._fast_path_matches(
                input_ids[:1],
                attention_mask[:1] if attention_mask is not None else None,
                None if position_ids is None else position_ids[:1],
            )
        dev = self.model.get_input_embeddings().weight.device
        kw = dict(
            input_ids=input_ids.to(dev),
            use_cache=False,
            attention_mask=None if attention_mask is None else attention_mask.to(dev),
            position_ids=None if position_ids is None else position_ids.to(dev),
        )
        h = self.model.base_model(**kw).last_hidden_state if self.fast else self.model(**kw).logits
        return h[rows.to(h.device), cols.to(h.device)]

    def logits(self, hidden_rows):
        out = self.model.get_output_embeddings()(hidden_rows) if self.fast else hidden_rows
        return out[:, : self.vocab_size]

    def forward(self, input_ids, attention_mask, rows, cols, position_ids=None):
        return self.logits(self.hidden_rows(input_ids, attention_mask, rows, cols, position_ids))

    @torch.no_grad()
    def _fast_path_matches(self, input_ids, attention_mask, position_ids) -> bool:
        """The lm_head on the base model's hidden states against the model's own logits, on one sample."""
        n = int(attention_mask[0].sum()) if attention_mask is not None else input_ids.shape[1]
        if position_ids is not None:  # packed: the first sample is where the positions first restart
            restart = (position_ids[0, 1:] == 0).nonzero()
            n = int(restart[0]) + 1 if len(restart) else n
        dev = self.model.get_input_embeddings().weight.device
        ids = input_ids[:, :n].to(dev)
        was_training = self.model.training
        self.model.eval()
        full = self.model(input_ids=ids, use_cache=False).logits[0].float()
        h = self.model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0]
        fast = self.model.get_output_embeddings()(h).float().to(full.device)
        self.model.train(was_training)
        tol = 1e-4 if h.dtype == torch.float32 else 2e-2
        ok = fast.shape == full.shape and torch.allclose(
            fast, full, rtol=tol, atol=tol * max(1.0, full.abs().max().item())
        )
        if not ok:
            warnings.warn("lm_head on hidden states does not reproduce this model's logits; using the full forward")
        return ok
