"""Offline assets: the cached SmolLM2 conversion, the tiny Llamas, path resolution, cache safety.

The SmolLM2 conversion runs once per machine (cached under the user's cache folder) behind a
session-scoped fixture; only `test_smollm2_matches_gguf` pays for a fresh GGUF load (~20 s).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from slap_ray import assets

pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        return assets.smollm2_dir()


def test_offline_packages_are_located_without_import() -> None:
    gguf = assets.smollm2_gguf_path()
    assert gguf.is_file() and gguf.suffix == ".gguf"
    assert (assets.minilm_dir() / "model.safetensors").is_file()


def test_smollm2_folder_is_complete_and_verified(smollm2_path: Path) -> None:
    names = {path.name for path in smollm2_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "slap_asset.json"} <= names
    info = json.loads((smollm2_path / "slap_asset.json").read_text())
    assert info["assets_version"] == assets.ASSETS_VERSION
    config = json.loads((smollm2_path / "config.json").read_text())
    assert "quantization_config" not in config


def test_smollm2_reloads_from_the_cache_with_chat_template(smollm2_path: Path) -> None:
    """A second load reuses the converted folder instead of converting again (no timing here:
    the reload speed, 0.3-0.5 s against ~20 s for the GGUF, is a benchmark number)."""
    marker = smollm2_path / "slap_asset.json"
    before = (marker.stat().st_mtime_ns, marker.read_text())
    model = assets.load_causal_lm("smollm2-135m-instruct")
    tokenizer = assets.load_tokenizer("smollm2-135m-instruct")
    assert assets.smollm2_dir() == smollm2_path
    assert (marker.stat().st_mtime_ns, marker.read_text()) == before
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token is not None
    assert len(tokenizer) == model.config.vocab_size == 49152


def test_smollm2_matches_gguf(smollm2_path: Path) -> None:
    gguf_model, gguf_tokenizer = assets.load_smollm2_from_gguf()
    model = assets.load_causal_lm("smollm2-135m-instruct")
    tokenizer = assets.load_tokenizer("smollm2-135m-instruct")
    messages = [{"role": "user", "content": "Name a colour of the sky."}]
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert ids == gguf_tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    text = "Hello, world! Ünïcødé and numbers 12345."
    assert tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]
    batch = torch.tensor([ids])
    with torch.no_grad():
        expected = gguf_model(batch).logits
        actual = model(batch).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("name", "tied", "vocab"),
    [
        ("tiny-random", True, 49152),
        ("tiny-random-untied", False, 49152),
        ("tiny-bpe", True, assets.TINY_BPE_VOCAB),
        ("tiny-bpe-untied", False, assets.TINY_BPE_VOCAB),
    ],
)
def test_tiny_llama_loads(name: str, tied: bool, vocab: int) -> None:
    folder = assets.tiny_bpe_dir if name.startswith("tiny-bpe") else assets.tiny_llama_dir
    path = folder(tie_word_embeddings=tied)
    assert assets.resolve_model_path(name) == str(path)
    model = assets.load_causal_lm(name)
    tokenizer = assets.load_tokenizer(name)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (64, 2, 128)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.vocab_size == len(tokenizer) == vocab
    assert config.tie_word_embeddings is tied
    shares = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert shares is tied
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False
    )
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), vocab) and torch.isfinite(logits).all()


def test_tiny_bpe_tokenizer_is_real_deterministic_and_chatml() -> None:
    """Trained here on chitchat: the same merges every build, every byte encodable, ChatML turns
    that the progressive-rendering label split accepts."""
    from slap_ray.data.tokenize import tokenize_conversation

    first, again = assets.train_tiny_bpe_tokenizer(), assets.train_tiny_bpe_tokenizer()
    assert first.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()
    cached = assets.load_tokenizer("tiny-bpe")
    text = "Hello, world! Ünïcødé and numbers 12345.\n\tTabs 🙂"
    ids = cached(text, add_special_tokens=False)["input_ids"]
    assert cached.decode(ids) == text and ids == first(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text.encode("utf-8"))  # merges were learnt, not bytes alone
    messages = [
        {"role": "user", "content": "How was your weekend?"},
        {"role": "assistant", "content": "Great, I went hiking."},
    ]
    rendered = cached.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>user\nHow was your weekend?<|im_end|>\n"
        "<|im_start|>assistant\nGreat, I went hiking.<|im_end|>\n"
    )
    example = tokenize_conversation(messages, cached, 96)
    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label >= 0]
    assert cached.decode(trained) == "Great, I went hiking.<|im_end|>\n"


def test_tiny_llama_is_seeded(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cached = assets.tiny_llama_dir(tie_word_embeddings=False)
    state = torch.random.get_rng_state()
    assets._tiny_builder(tie_word_embeddings=False)(tmp_path)
    assert torch.equal(torch.random.get_rng_state(), state), "building must not touch global RNG"
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    for key, value in AutoModelForCausalLM.from_pretrained(cached).state_dict().items():
        assert torch.equal(value, fresh[key]), key


def test_resolve_model_path(tmp_path: Path) -> None:
    assert assets.resolve_model_path("SmolLM2-135M-Instruct") == str(assets.smollm2_dir())
    assert assets.resolve_model_path("tiny-random") != assets.resolve_model_path(
        "tiny-random-untied"
    )
    assert assets.resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert assets.resolve_model_path("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    assert assets.resolve_model_path(str(tmp_path / "absent")) == str(tmp_path / "absent")
    assert assets.resolve_embedder_path("all-MiniLM-L6-v2") == str(assets.minilm_dir())
    assert assets.resolve_embedder_path("other/embedder") == "other/embedder"


def test_minilm_embeds_offline() -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(assets.resolve_embedder_path("all-minilm-l6-v2"), device="cpu")
    embeddings = model.encode(["a cat sat on the mat", "the sky is blue"])
    assert embeddings.shape == (2, 384)


def test_cache_dir_is_versioned(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLAP_CACHE_DIR", str(tmp_path))
    assert assets.cache_root() == tmp_path / assets.ASSETS_VERSION
    monkeypatch.delenv("SLAP_CACHE_DIR")
    assert assets.cache_root() == Path.home() / ".cache" / "slap_ray" / assets.ASSETS_VERSION


def test_build_once_is_atomic_and_shared(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLAP_CACHE_DIR", str(tmp_path))
    calls: list[int] = []

    def build(out: Path) -> dict[str, object]:
        calls.append(1)
        time.sleep(0.2)  # widen the race window
        (out / "weights.bin").write_bytes(b"x" * 1000)
        return {}

    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(assets._build_once("thing", build)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 4
    assert (results[0] / "weights.bin").stat().st_size == 1000
    leftovers = [p.name for p in (tmp_path / assets.ASSETS_VERSION).iterdir() if p.is_dir()]
    assert leftovers == ["thing"]


def test_failed_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLAP_CACHE_DIR", str(tmp_path))

    def broken(out: Path) -> dict[str, object]:
        (out / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        assets._build_once("thing", broken)
    assert not [p for p in (tmp_path / assets.ASSETS_VERSION).iterdir() if p.is_dir()]
    built = assets._build_once("thing", lambda out: {})
    assert (built / "slap_asset.json").is_file()


@pytest.mark.parametrize("name", ["tiny-random", "tiny-random-untied"])
def test_parameter_count_reads_headers_and_equals_the_loaded_model(name: str) -> None:
    model = assets.load_causal_lm(name)
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}  # tied weights once
    assert assets.parameter_count(name) == sum(unique.values())


def test_parameter_count_of_an_unknown_hub_id_is_none() -> None:
    assert assets.parameter_count("some-org/not-downloaded-model") is None


def test_parameter_count_never_converts_a_model(tmp_path, monkeypatch) -> None:
    """Counting is a report line: an alias not yet built here counts as unknown, and nothing
    is converted (the selection job's driver would otherwise convert SmolLM2 just to count)."""
    monkeypatch.setenv("SLAP_CACHE_DIR", str(tmp_path))
    assert assets.parameter_count("smollm2-135m-instruct") is None
    assert assets.parameter_count("tiny-random") is None
    assert not any(tmp_path.rglob("*.safetensors"))
    built = assets.tiny_llama_dir()
    assert assets.built_model_path("TINY-random") == built
    assert assets.parameter_count("tiny-random") > 0


def test_report_says_why_the_scoring_cost_is_unknown(tmp_path, monkeypatch) -> None:
    """A model never converted here leaves the cost unknown, and the report says which one."""
    from slap_ray.reporting.selection import scoring_cost, scoring_cost_lines

    monkeypatch.setenv("SLAP_CACHE_DIR", str(tmp_path))
    assets.tiny_llama_dir()
    cost = scoring_cost("tiny-random", "smollm2-135m-instruct", [0.3])
    line = " ".join(scoring_cost_lines("tiny-random", cost))
    assert "unknown" in line and "model.name `smollm2-135m-instruct`" in line
    assert "score.model" not in line
    known = scoring_cost("tiny-random", "tiny-random", [0.0, 0.3])
    assert list(known["fraction_per_alpha"]) == ["0.3"]
    assert known["fraction_per_alpha"]["0.3"] == pytest.approx(2 / (6 * 0.3))
    assert "33.3%" not in " ".join(scoring_cost_lines("tiny-random", known))
    assert "111.1%" in " ".join(scoring_cost_lines("tiny-random", known))
    unset = scoring_cost("smollm2-135m-instruct", "smollm2-135m-instruct", [0.3])
    assert unset == {
        "unknown": "model.name `smollm2-135m-instruct` not converted on this machine yet "
        "(or not a local folder)"
    }
