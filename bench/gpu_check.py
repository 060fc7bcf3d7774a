"""GPU check of the pure core (``slap_ray.core``): scoring, training and bf16 paths, throughput.

    PYTHONPATH=. python bench/gpu_check.py --model-dir PATH [--no-big] [--out FILE.json]

``--model-dir``: a local Hugging Face folder (the tiny random Llama of ``slap_ray.assets``, whose
tokenizer is SmolLM2's). Everything runs on CUDA when torch sees it (else on the CPU, where the
device-vs-CPU comparisons are trivially exact and only the plumbing is exercised):

1. ``scoring_fp32``: second-moment calibration, losses and LM-head features (adam, factored,
   none preconditioners) and ``score_batch``'s selections on the device against the same calls
   on the CPU in float32.
2. ``training_fp32`` / ``onpolicy_fp32``: one LoRA step (``core.onpolicy.onpolicy_step`` + clip +
   AdamW, as ``slap_ray.ray.train_loop`` strings them) on the device against the CPU: the full
   batch, then on-policy SLAP in both modes.
3. ``scoring_bf16`` / ``logits_buffer`` / ``training_bf16``: the model in bfloat16 for scoring,
   the logits buffer under bf16 / autocast / autograd, and the training step under
   ``torch.autocast(bfloat16)``, each against the device's float32 results.
4. ``throughput`` (``--no-big`` skips it): a seeded random Llama of SmolLM2-135M's shape built in
   process: scoring rows/s and LoRA step time in float32 and bf16, peak GPU memory.

Imports only torch, numpy, transformers, peft, pydantic (the selection spec) and Ray-free
slap_ray modules (no Ray: ``slap_ray.assets`` and ``slap_ray.config`` are not used). Every check records its
assertions in one JSON object (stdout, and ``--out``); the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from functools import cached_property, partial
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from slap_ray.core.features import (  # noqa: E402
    PreconditionerCache,
    SecondMomentEMA,
    response_softmax_,
    response_token_losses_packed,
)
from slap_ray.core.model import LogitsBuffer, forward_micro_batches  # noqa: E402
from slap_ray.core.onpolicy import SelectionSettings, onpolicy_step  # noqa: E402
from slap_ray.core.scoring import (  # noqa: E402
    ScoringSettings,
    ScoringState,
    Selection,
    calibrate_second_moment,
    losses_and_features,
    score_batch,
    selections_for,
)
from slap_ray.core.seeds import derive_rng  # noqa: E402
from slap_ray.core.selection import n_keep_for  # noqa: E402
from slap_ray.core.training import (  # noqa: E402
    add_lora,
    lm_head_is_trained,
    make_optimizer,
    warmup_cosine,
)
from slap_ray.data.tokenize import tokenize_conversation  # noqa: E402
from slap_ray.selection_spec import SelectionSpec  # noqa: E402

# Tolerances. Errors are "normwise": max |value - reference| / max |reference| over the tensor
# (elementwise relative errors of near-zero feature entries mean nothing).
# float32 on two devices: both IEEE fp32 (matmul precision "highest", no TF32), only the
# reduction orders differ: ~sqrt(K) * 6e-8 per GEMM (K <= 1536), compounded over a few layers,
# i.e. ~1e-6 to 1e-5. 1e-4 on losses and 1e-3 on features, moments and gradients leave 10-100x
# headroom yet catch TF32 (10-bit mantissa, ~5e-4 per GEMM) or a bf16 slip (~4e-3) in fp32 code.
FP32_LOSS_RTOL = 1e-4
FP32_TENSOR_RTOL = 1e-3
# bfloat16 against float32: unit roundoff u = 2**-8 = 3.9e-3 on every GEMM input and activation.
# A loss is a mean over tokens of lse - z_y, whose rounding errors partly average out: 5e-3
# (0.05 nats at ln(V) = 10.8, above one u) where the tiny model measures ~5e-5 on the CPU.
# Gradients and the raw / factored features are products of a few rounded factors: 5e-2
# (~13 u; measured <= 6e-3). The adam-preconditioned features weight most the (v, h) entries
# whose calibrated gradient nearly cancels (tiny s_hat), where a bf16 forward's absolute error
# is relatively largest: measured 4e-2 on the CPU, so 0.15 (a real bug is O(1)).
BF16_LOSS_RTOL = 5e-3
BF16_TENSOR_RTOL = 5e-2
BF16_ADAM_FEATURE_RTOL = 0.15
# Gradient direction under bf16 autocast: cosine >= 0.99, i.e. a relative error of <= 14%.
BF16_GRAD_COSINE = 0.99
LR = 1e-3  # large enough that one AdamW step visibly lowers the batch loss
ADAM_EPS = 1e-8
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MICRO = 4  # rows per micro-batch: the 12-row batch spans 3, so padding and re-ordering matter

CONVERSATIONS: list[list[dict[str, str]]] = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Give me three prime numbers."},
        {"role": "assistant", "content": "2, 3 and 5."},
    ],
    [
        {"role": "user", "content": "Translate 'good morning' into Spanish."},
        {"role": "assistant", "content": "Buenos dias."},
    ],
    [
        {"role": "user", "content": "Write a haiku about autumn leaves."},
        {
            "role": "assistant",
            "content": "Red leaves drift and fall,\nwhispering to the cold ground,\n"
            "summer says goodbye.",
        },
    ],
    [
        {"role": "user", "content": "How do I reverse a list in Python?"},
        {
            "role": "assistant",
            "content": "Use slicing: `items[::-1]` returns a reversed copy, while "
            "`items.reverse()` reverses the list in place and returns None.",
        },
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Tell me a fun fact about octopuses."},
        {
            "role": "assistant",
            "content": "Octopuses have three hearts: two pump blood through the gills and "
            "one through the rest of the body.",
        },
    ],
    [
        {"role": "user", "content": "Summarise the water cycle in one sentence."},
        {
            "role": "assistant",
            "content": "Water evaporates, condenses into clouds, falls as precipitation and "
            "flows back to the oceans, over and over.",
        },
    ],
    [
        {"role": "system", "content": "Answer with a single number."},
        {"role": "user", "content": "What is 12 times 12?"},
        {"role": "assistant", "content": "144"},
    ],
    [
        {
            "role": "user",
            "content": "I am planning a three-day trip to Rome in spring. Which sights should "
            "I not miss, and how should I split them across the days to avoid long queues?",
        },
        {
            "role": "assistant",
            "content": "Day one: the Colosseum, the Roman Forum and the Palatine Hill, booked "
            "for the first morning slot. Day two: the Vatican Museums and St Peter's Basilica, "
            "arriving before opening. Day three: the Pantheon, Piazza Navona and the Trevi "
            "Fountain early in the day, then Trastevere for dinner.",
        },
    ],
    [
        {"role": "user", "content": "Is a tomato a fruit or a vegetable?"},
        {
            "role": "assistant",
            "content": "Botanically it is a fruit (a berry); in cooking it is used as a vegetable.",
        },
    ],
    [
        {"role": "user", "content": "Explain recursion to a child."},
        {
            "role": "assistant",
            "content": "Recursion is when something is defined using a smaller copy of itself, "
            "like a set of nesting dolls: open one and there is a smaller one inside, until "
            "you reach the tiniest doll.",
        },
        {"role": "user", "content": "And what stops it?"},
        {"role": "assistant", "content": "The tiniest doll: the base case that has no copy."},
    ],
    [
        {"role": "user", "content": "Name a colour of the rainbow."},
        {"role": "assistant", "content": "Indigo."},
    ],
]


# --------------------------------------------------------------------------- checks and report


class Check:
    """The assertions of one check: each recorded with its value and limit, never raised."""

    def __init__(self) -> None:
        self.asserts: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}

    def at_most(self, what: str, value: float, limit: float) -> None:
        value = float(value)
        ok = math.isfinite(value) and value <= limit
        self.asserts.append({"what": what, "value": value, "limit": f"<= {limit:g}", "ok": ok})

    def at_least(self, what: str, value: float, limit: float) -> None:
        value = float(value)
        ok = math.isfinite(value) and value >= limit
        self.asserts.append({"what": what, "value": value, "limit": f">= {limit:g}", "ok": ok})

    def true(self, what: str, condition: bool, detail: Any = None) -> None:
        entry = {"what": what, "ok": bool(condition)}
        if detail is not None:
            entry["detail"] = detail
        self.asserts.append(entry)

    def finite(self, what: str, *values) -> None:
        self.true(f"{what} finite", all(bool(np.isfinite(_np(v)).all()) for v in values))

    @property
    def passed(self) -> bool:
        return bool(self.asserts) and all(a["ok"] for a in self.asserts)


def run_check(report: dict, name: str, body: Callable[[Check], None]) -> None:
    check, start, error = Check(), time.perf_counter(), None
    try:
        body(check)
    except Exception as exc:  # recorded, so one broken check does not hide the others
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-4)}"
    entry = {
        "passed": check.passed and error is None,
        "seconds": round(time.perf_counter() - start, 2),
        "failed_asserts": [a for a in check.asserts if not a["ok"]],
        "asserts": check.asserts,
        "info": check.info,
    }
    if error is not None:
        entry["error"] = error
    report[name] = entry
    print(f"[gpu_check] {name}: {'pass' if entry['passed'] else 'FAIL'} "
          f"({entry['seconds']} s)", file=sys.stderr, flush=True)  # fmt: skip


def _np(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def error(value, reference) -> dict[str, float]:
    """max_abs = max |value - reference|; rel = max_abs / max |reference| (normwise)."""
    a, b = _np(value), _np(reference)
    if a.shape != b.shape:
        raise ValueError(f"shape {a.shape} != reference {b.shape}")
    if not a.size:
        return {"max_abs": 0.0, "rel": 0.0}
    max_abs = float(np.abs(a - b).max())
    scale = float(np.abs(b).max())
    if scale > 0:
        return {"max_abs": max_abs, "rel": max_abs / scale}
    return {"max_abs": max_abs, "rel": 0.0 if max_abs == 0 else math.inf}


def cosine(a, b) -> float:
    x, y = _np(a).ravel(), _np(b).ravel()
    denominator = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / denominator) if denominator > 0 else math.nan


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


class CountingBuffer(LogitsBuffer):
    """A ``LogitsBuffer`` that counts its ``take`` calls: 0 means the buffer was bypassed."""

    def __init__(self) -> None:
        super().__init__()
        self.takes = 0

    def take(self, rows, cols, dtype, device):
        self.takes += 1
        return super().take(rows, cols, dtype, device)


# --------------------------------------------------------------------------- shared setup


class Setup:
    """Tokenizer, batch and models, each built on first use (a failure fails only its users)."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        from transformers import AutoTokenizer

        self.args, self.device, self.seed = args, device, args.seed
        self.tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        if self.tokenizer.pad_token is None:  # as slap_ray.assets does: eos pads (masked anyway)
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad = self.tokenizer.pad_token_id
        rows = [tokenize_conversation(c, self.tokenizer, 256) for c in CONVERSATIONS]
        self.ids = [r.input_ids for r in rows]
        self.labels = [r.labels for r in rows]
        self.batch = list(zip(self.ids, self.labels, strict=True))
        half = len(rows) // 2
        self.calibration = [
            (self.ids[:half], self.labels[:half]),
            (self.ids[half:], self.labels[half:]),
        ]
        self.autocast = partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
        self.results: dict[str, Any] = {}  # device fp32 results the bf16 checks compare with

    @cached_property
    def cpu_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.args.model_dir, dtype=torch.float32)
        return model.eval()

    @cached_property
    def dev_model(self) -> torch.nn.Module:
        return copy.deepcopy(self.cpu_model).to(self.device)

    @cached_property
    def bf16_model(self) -> torch.nn.Module:
        return copy.deepcopy(self.cpu_model).to(self.device, torch.bfloat16)

    @cached_property
    def lora_cpu(self) -> torch.nn.Module:
        """The seeded LoRA model on the CPU; every training run starts from a copy of it."""
        torch.manual_seed(self.seed)
        model = add_lora(copy.deepcopy(self.cpu_model), 8, 16.0, 0.0, LORA_TARGETS)
        return model.train()

    def moment(self, model: torch.nn.Module) -> torch.Tensor | None:
        return calibrate_second_moment(
            model, self.calibration, self.pad, micro_batch_size=MICRO
        ).value()

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self.results:
            self.results[key] = build()
        return self.results[key]


SELECTIONS = [
    *selections_for(SelectionSpec(), [0.25, 0.5], seed=0),
    Selection("factored-a0.5", 0.5, 0, SelectionSpec(preconditioner="factored")),
    Selection("none-a0.5", 0.5, 0, SelectionSpec(preconditioner="none")),
    Selection("hard-a0.5", 0.5, 0, SelectionSpec(method="online_hard")),
]


def score_all(setup: Setup, model: torch.nn.Module, moment: torch.Tensor | None) -> dict:
    """Losses and features per preconditioner (``losses_and_features``), then ``score_batch``;
    one logits buffer and preconditioner cache throughout, as a scorer actor keeps them."""
    buffer, out = CountingBuffer(), {}
    settings = ScoringSettings(pad_token_id=setup.pad, micro_batch_size=MICRO)
    state = ScoringState(moment, PreconditionerCache(), logits_buffer=buffer)
    for kind in ("adam", "factored", "none"):
        losses, features = losses_and_features(
            model, setup.ids, setup.labels, settings, state, preconditioner=kind
        )
        out[kind] = features
    out["losses"] = losses
    scores = score_batch(
        model, setup.ids, setup.labels, settings, selections=SELECTIONS, batch_key=0, state=state
    )
    out["keep"] = {k: np.flatnonzero(v).tolist() for k, v in scores.keep.items()}
    out["strata"] = scores.loss_strata.tolist()
    out["score_losses"] = scores.losses
    out["buffer_takes"] = buffer.takes
    return out


def _strata_margin(losses: np.ndarray, num_strata: int = 3) -> float:
    """Smallest distance of a loss to an inner edge of the width strata (a flip needs a loss
    error at least this large)."""
    low, high = float(losses.min()), float(losses.max())
    edges = low + (high - low) * np.arange(1, num_strata) / num_strata
    return float(np.abs(losses[:, None] - edges[None, :]).min())


def check_scoring_fp32(check: Check, setup: Setup) -> None:
    """Calibration, losses, features and selections: device float32 against CPU float32."""
    ref_moment = setup.moment(setup.cpu_model)
    moment = setup.cached("moment", lambda: setup.moment(setup.dev_model))
    check.finite("device second moment", moment)
    e = error(moment, ref_moment)
    check.info["second_moment"] = e
    check.at_most("second moment rel err vs CPU", e["rel"], FP32_TENSOR_RTOL)
    ref = score_all(setup, setup.cpu_model, ref_moment)
    dev = setup.cached("scores", lambda: score_all(setup, setup.dev_model, moment))
    check.finite("device losses and features", dev["losses"], dev["adam"], dev["factored"])
    e = error(dev["losses"], ref["losses"])
    check.info["losses"] = {**e, "device": dev["losses"].tolist(), "cpu": ref["losses"].tolist()}
    check.at_most("losses rel err vs CPU", e["rel"], FP32_LOSS_RTOL)
    check.true("score_batch losses == losses_and_features losses (device)",
               np.array_equal(dev["score_losses"], dev["losses"]))  # fmt: skip
    for kind in ("adam", "factored", "none"):
        e = error(dev[kind], ref[kind])
        check.info[f"features_{kind}"] = e
        check.at_most(f"features ({kind}) rel err vs CPU", e["rel"], FP32_TENSOR_RTOL)
    check.true("logits buffer used in fp32 scoring (device)", dev["buffer_takes"] > 0)
    differing = {k: {"device": dev["keep"][k], "cpu": ref["keep"][k]}
                 for k in ref["keep"] if dev["keep"][k] != ref["keep"][k]}  # fmt: skip
    check.info["kept_rows"] = {"device": dev["keep"], "cpu": ref["keep"]}
    check.info["strata"] = {"device": dev["strata"], "cpu": ref["strata"]}
    check.info["strata_edge_margin"] = _strata_margin(ref["losses"])
    check.true("loss strata identical on both devices", dev["strata"] == ref["strata"])
    check.true("kept rows identical on both devices", not differing, differing or None)


def _trainer(model: torch.nn.Module, total_steps: int = 10):
    optimizer = make_optimizer(model, LR, eps=ADAM_EPS)
    scheduler = warmup_cosine(optimizer, total_steps, 0.0)
    ema = None if lm_head_is_trained(model) else SecondMomentEMA()
    return optimizer, scheduler, ema


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors])


def batch_losses(setup: Setup, model, autocast=nullcontext) -> np.ndarray:
    """Per-row losses of the batch as the training step computes them (no grad)."""
    out = np.empty(len(setup.ids))
    for micro in forward_micro_batches(
        model, setup.ids, setup.labels, setup.pad, MICRO, autocast=autocast
    ):
        out[micro.rows] = _np(response_token_losses_packed(micro.logits, micro.aligned))
    return out


def train_once(
    setup: Setup,
    device: torch.device,
    settings: SelectionSettings,
    *,
    micro: int,
    autocast=nullcontext,
    moment: torch.Tensor | None = None,
) -> dict:
    """One step from the seeded LoRA model, as ``train_loop`` runs it: ``onpolicy_step`` (the
    LM head is frozen: its EMA is updated), clip to 1.0, AdamW, scheduler."""
    model = copy.deepcopy(setup.lora_cpu).to(device)
    optimizer, scheduler, ema = _trainer(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = _flat(trainable)
    stats = onpolicy_step(
        model, setup.batch, range(len(setup.batch)), len(setup.batch), settings,
        derive_rng(setup.seed, "online-select", settings.method, settings.alpha, 0), setup.pad,
        micro_batch_size=micro, second_moment=moment, lm_head_ema=ema, autocast=autocast,
    )  # fmt: skip
    grads = _flat([p.grad for p in trainable])
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, 1.0))
    clipped = _flat([p.grad for p in trainable])
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    after = _flat(trainable)
    with torch.no_grad():
        losses_after = batch_losses(setup, model, autocast)
    return {
        "kept": stats.kept.tolist(),
        "losses": stats.losses,
        "objective": stats.objective,
        "grads": grads,
        "clipped": clipped,
        "grad_norm": grad_norm,
        "before": before,
        "after": after,
        "losses_after": losses_after,
        "ema": None if ema is None or ema.value() is None else ema.value().cpu(),
    }


def _adam_first_step(run: dict) -> torch.Tensor:
    """The weights AdamW's first step must give (bias-corrected m / sqrt(v) = g / |g|)."""
    g = run["clipped"]
    return run["before"] - LR * g / (g.abs() + ADAM_EPS)


def _compare_steps(check: Check, label: str, dev: dict, ref: dict) -> None:
    """Two runs of the same step (device vs CPU, float32): losses, gradients, weights."""
    e = error(dev["losses"], ref["losses"])
    check.info[f"{label}_losses"] = e
    check.at_most(f"{label}: per-row loss rel err", e["rel"], FP32_LOSS_RTOL)
    e = error(dev["grads"], ref["grads"])
    check.info[f"{label}_grads"] = {
        **e,
        "norm_device": dev["grad_norm"],
        "norm_cpu": ref["grad_norm"],
    }
    check.at_most(f"{label}: LoRA gradient rel err", e["rel"], FP32_TENSOR_RTOL)
    # AdamW's first step moves each weight by lr * g / (|g| + eps): about lr * sign(g), so a
    # gradient entry within the two devices' gradient error of 0 may take either sign. The
    # weights must agree wherever |g| > 100 max(gradient error, eps): there the step's
    # sensitivity lr * eps / g**2 times the error is below 1e-4 lr; 1e-3 lr is asserted.
    g_error = float((dev["clipped"] - ref["clipped"]).abs().max())
    stable = ref["clipped"].abs() > 100 * max(g_error, ADAM_EPS)
    diff = (dev["after"] - ref["after"]).abs()
    check.info[f"{label}_weights_after"] = {
        "max_abs_diff": float(diff.max()),
        "max_abs_diff_stable": float(diff[stable].max()) if stable.any() else 0.0,
        "unstable_entries": int((~stable).sum() - (ref["clipped"] == 0).sum()),
        "zero_grad_entries": int((ref["clipped"] == 0).sum()),
        "entries": int(diff.numel()),
        "lr": LR,
    }
    check.at_most(f"{label}: LoRA weights after the step, max abs diff (stable entries)",
                  check.info[f"{label}_weights_after"]["max_abs_diff_stable"], 1e-3 * LR)  # fmt: skip
    e = error(dev["losses_after"], ref["losses_after"])
    check.info[f"{label}_losses_after"] = e
    check.at_most(f"{label}: per-row loss after the step rel err", e["rel"], FP32_LOSS_RTOL)


def _step_sanity(check: Check, label: str, run: dict) -> None:
    check.finite(f"{label}: losses, gradients, weights", run["losses"], run["grads"], run["after"])
    before, after = float(np.mean(run["losses"])), float(np.mean(run["losses_after"]))
    check.info[f"{label}_mean_loss"] = {"before": before, "after": after}
    check.true(f"{label}: one step lowers the batch loss", after < before, [before, after])
    # AdamW on the device does what AdamW's first step is: fp32 rounding of w and lr * g/|g|.
    e = error(run["after"], _adam_first_step(run))
    check.at_most(
        f"{label}: AdamW first step matches lr * g / (|g| + eps)", e["max_abs"], 1e-4 * LR
    )


def check_training_fp32(check: Check, setup: Setup, device: torch.device) -> None:
    """The full-batch LoRA step (offline mode: alpha 0) on the device against the CPU."""
    full = SelectionSettings(SelectionSpec(method="full"), alpha=0.0)
    ref = train_once(setup, torch.device("cpu"), full, micro=MICRO)
    dev = setup.cached("train_full", lambda: train_once(setup, device, full, micro=MICRO))
    _step_sanity(check, "device", dev)
    _step_sanity(check, "cpu", ref)
    _compare_steps(check, "full", dev, ref)
    # LoRA's B starts at 0, so A's gradient is exactly 0 and AdamW must leave A untouched.
    zero = dev["clipped"] == 0
    check.true("zero-gradient entries (LoRA A at init) unchanged by the step",
               bool(zero.any()) and bool((dev["after"][zero] == dev["before"][zero]).all()),
               int(zero.sum()))  # fmt: skip
    e = error(dev["ema"], ref["ema"])
    check.info["lm_head_ema"] = e
    check.at_most("LM-head EMA (frozen head) rel err", e["rel"], FP32_TENSOR_RTOL)


def check_onpolicy_fp32(check: Check, setup: Setup, device: torch.device) -> None:
    """On-policy SLAP at alpha 0.5, both modes, with the calibrated second moment."""
    ref_moment = setup.moment(setup.cpu_model)
    moment = setup.cached("moment", lambda: setup.moment(setup.dev_model))
    kept = SelectionSettings(SelectionSpec(method="slap"), alpha=0.5, onpolicy="kept_graphs")
    recompute = SelectionSettings(SelectionSpec(method="slap"), alpha=0.5, onpolicy="recompute")
    ref = train_once(setup, torch.device("cpu"), kept, micro=1, moment=ref_moment)
    dev = setup.cached(
        "train_slap", lambda: train_once(setup, device, kept, micro=1, moment=moment)
    )
    again = train_once(setup, device, recompute, micro=MICRO, moment=moment)
    check.finite("device losses, gradients", dev["losses"], dev["grads"], again["grads"])
    check.info["kept"] = {
        "device": dev["kept"],
        "cpu": ref["kept"],
        "device_recompute": again["kept"],
    }
    check.true("kept rows identical on both devices", dev["kept"] == ref["kept"])
    check.true("kept_graphs and recompute keep the same rows", dev["kept"] == again["kept"])
    check.at_most("objective rel err vs CPU",
                  abs(dev["objective"] - ref["objective"]) / abs(ref["objective"]), FP32_LOSS_RTOL)  # fmt: skip
    if dev["kept"] == ref["kept"]:
        _compare_steps(check, "slap", dev, ref)
        e = error(dev["ema"], ref["ema"])
        check.info["lm_head_ema"] = e
        check.at_most("LM-head EMA rel err vs CPU", e["rel"], FP32_TENSOR_RTOL)
    if dev["kept"] == again["kept"]:
        # Same kept rows, same gradient, whichever mode (docstring of _recompute_kept).
        e = error(again["grads"], dev["grads"])
        check.info["recompute_vs_kept_graphs_grads"] = e
        check.at_most("recompute vs kept_graphs gradient rel err", e["rel"], FP32_TENSOR_RTOL)


def check_scoring_bf16(check: Check, setup: Setup) -> None:
    """The model in bfloat16 (``model.dtype: bfloat16``) against the device's float32 scores."""
    moment = setup.cached("moment", lambda: setup.moment(setup.dev_model))
    fp32 = setup.cached("scores", lambda: score_all(setup, setup.dev_model, moment))
    bf16_moment = setup.moment(setup.bf16_model)  # what a bf16 calibration task would save
    check.finite("bf16 second moment", bf16_moment)
    e = error(bf16_moment, moment)
    check.info["second_moment"] = e
    # The moment is squared gradients: twice the gradients' relative error.
    check.at_most("bf16 second moment rel err vs fp32", e["rel"], 2 * BF16_TENSOR_RTOL)
    bf16 = score_all(setup, setup.bf16_model, moment)  # the same moment: isolates the forward
    check.finite("bf16 losses and features", bf16["losses"], bf16["adam"], bf16["factored"])
    e = error(bf16["losses"], fp32["losses"])
    check.info["losses"] = {**e, "bf16": bf16["losses"].tolist()}
    check.at_most("bf16 losses rel err vs fp32", e["rel"], BF16_LOSS_RTOL)
    for kind in ("adam", "factored", "none"):
        e = error(bf16[kind], fp32[kind])
        check.info[f"features_{kind}"] = e
        limit = BF16_ADAM_FEATURE_RTOL if kind == "adam" else BF16_TENSOR_RTOL
        check.at_most(f"bf16 features ({kind}) rel err vs fp32", e["rel"], limit)
    # Random weights give near-equal losses, so bf16 rounding may reorder rows: reported only.
    check.info["kept_rows"] = {"bf16": bf16["keep"], "fp32": fp32["keep"]}
    check.info["kept_overlap"] = {
        k: len(set(bf16["keep"][k]) & set(fp32["keep"][k])) / max(1, len(fp32["keep"][k]))
        for k in fp32["keep"]
    }


def _logits(setup: Setup, model, *, buffer=None, autocast=nullcontext, grad=False):
    """Concatenated response logits (cloned: a buffer is reused) and per-row losses."""
    parts, losses = [], np.empty(len(setup.ids))
    for micro in forward_micro_batches(
        model, setup.ids, setup.labels, setup.pad, MICRO, grad=grad, autocast=autocast,
        logits_buffer=buffer,
    ):  # fmt: skip
        logits = micro.logits.detach().clone()
        parts.append(logits.clone())
        row_losses, _ = response_softmax_(logits, micro.aligned, probabilities=False)
        losses[micro.rows] = _np(row_losses)
    return torch.cat(parts), losses


def check_logits_buffer(check: Check, setup: Setup) -> None:
    """``forward_response_logits`` writes into the buffer only for a no-grad, no-autocast
    forward (then the same GEMM: bit-identical); autocast and autograd must bypass it."""
    for name, model in (("fp32", setup.dev_model), ("bf16", setup.bf16_model)):
        buffer = CountingBuffer()
        with_buffer, _ = _logits(setup, model, buffer=buffer)
        plain, _ = _logits(setup, model)
        check.true(f"{name} model: buffer used", buffer.takes > 0, buffer.takes)
        e = error(with_buffer, plain)
        check.info[f"{name}_buffer_vs_fresh"] = e
        check.true(f"{name} model: buffered logits bit-identical to fresh", e["max_abs"] == 0.0, e)
    fp32, fp32_losses = _logits(setup, setup.dev_model)
    buffer = CountingBuffer()
    cast, cast_losses = _logits(setup, setup.dev_model, buffer=buffer, autocast=setup.autocast)
    cast_plain, _ = _logits(setup, setup.dev_model, autocast=setup.autocast)
    check.true("autocast: buffer bypassed", buffer.takes == 0, buffer.takes)
    check.true("autocast: logits equal the unbuffered autocast call",
               error(cast, cast_plain)["max_abs"] == 0.0)  # fmt: skip
    check.finite("autocast logits and losses", cast, cast_losses)
    e = error(cast, fp32)
    check.info["autocast_logits_vs_fp32"] = e
    check.at_most("autocast logits rel err vs fp32", e["rel"], BF16_TENSOR_RTOL)
    e = error(cast_losses, fp32_losses)
    check.info["autocast_losses_vs_fp32"] = e
    check.at_most("autocast losses rel err vs fp32", e["rel"], BF16_LOSS_RTOL)
    buffer = CountingBuffer()
    _logits(setup, setup.dev_model, buffer=buffer, grad=True)
    check.true("autograd: buffer bypassed", buffer.takes == 0, buffer.takes)


def check_training_bf16(check: Check, setup: Setup, device: torch.device) -> None:
    """The step under ``torch.autocast(bfloat16)`` (train.precision: bf16) against fp32."""
    full = SelectionSettings(SelectionSpec(method="full"), alpha=0.0)
    fp32 = setup.cached("train_full", lambda: train_once(setup, device, full, micro=MICRO))
    bf16 = train_once(setup, device, full, micro=MICRO, autocast=setup.autocast)
    _step_sanity(check, "bf16 full", bf16)
    e = error(bf16["losses"], fp32["losses"])
    check.info["losses"] = e
    check.at_most("bf16 per-row losses rel err vs fp32", e["rel"], BF16_LOSS_RTOL)
    e = error(bf16["grads"], fp32["grads"])
    check.info["grads"] = {**e, "cosine": cosine(bf16["grads"], fp32["grads"])}
    check.at_most("bf16 LoRA gradient rel err vs fp32", e["rel"], 2 * BF16_TENSOR_RTOL)
    check.at_least("bf16 LoRA gradient cosine vs fp32", check.info["grads"]["cosine"],
                   BF16_GRAD_COSINE)  # fmt: skip
    # AdamW's first step is ~lr * sign(g): entries with |g| near 0 may flip, so the update is
    # compared by direction only (reported, with the loss decrease asserted above).
    check.info["update_cosine_vs_fp32"] = cosine(
        bf16["after"] - bf16["before"], fp32["after"] - fp32["before"]
    )
    moment = setup.cached("moment", lambda: setup.moment(setup.dev_model))
    kept = SelectionSettings(SelectionSpec(method="slap"), alpha=0.5, onpolicy="kept_graphs")
    slap = train_once(setup, device, kept, micro=1, autocast=setup.autocast, moment=moment)
    check.finite("bf16 on-policy SLAP losses, gradients, EMA", slap["losses"], slap["grads"],
                 slap["ema"])  # fmt: skip
    check.true("bf16 on-policy SLAP kept n_keep rows", len(slap["kept"]) == len(setup.ids) // 2)
    fp32_slap = setup.cached(
        "train_slap", lambda: train_once(setup, device, kept, micro=1, moment=moment)
    )
    check.info["slap_kept"] = {"bf16": slap["kept"], "fp32": fp32_slap["kept"]}


# --------------------------------------------------------------------------- throughput


def synthetic_rows(rng: np.random.Generator, count: int, lengths: tuple[int, int], vocab: int):
    """Random token rows: the first 40% prompt (unlabelled), the rest the response."""
    ids, labels = [], []
    for _ in range(count):
        length = int(rng.integers(lengths[0], lengths[1] + 1))
        tokens = rng.integers(3, vocab, size=length).tolist()
        prompt = max(1, int(0.4 * length))
        ids.append(tokens)
        labels.append([-100] * prompt + tokens[prompt:])
    return ids, labels


def big_model(setup: Setup, device: torch.device) -> torch.nn.Module:
    """A seeded random Llama of SmolLM2-135M's shape (tied head), built on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = setup.tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536,
        num_hidden_layers=setup.args.big_layers, num_attention_heads=9, num_key_value_heads=3,
        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=setup.pad,
    )  # fmt: skip
    torch.manual_seed(setup.seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.eval()


def timed(device: torch.device, run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Mean seconds of ``repeats`` calls after one warm-up call (synchronised)."""
    run()
    synchronize(device)
    start, out = time.perf_counter(), None
    for _ in range(repeats):
        out = run()
    synchronize(device)
    return (time.perf_counter() - start) / repeats, out


def check_throughput(check: Check, setup: Setup, device: torch.device) -> None:
    args = setup.args
    rng = np.random.default_rng(setup.seed)
    model = big_model(setup, device)
    vocab = model.config.vocab_size
    check.info["model"] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab": vocab,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
    batches = [synthetic_rows(rng, args.score_batch, (128, 512), vocab) for _ in range(2)]
    reset_peak(device)
    start = time.perf_counter()
    moment = calibrate_second_moment(model, batches[:1], setup.pad, micro_batch_size=8).value()
    synchronize(device)
    check.info["calibrate_fp32_seconds"] = round(time.perf_counter() - start, 3)
    selections = selections_for(SelectionSpec(), [0.2, 0.3, 0.4], setup.seed)
    losses = {}
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    settings = ScoringSettings(pad_token_id=setup.pad, micro_batch_size=8)
    for name, scorer in (("fp32", model), ("bf16", bf16_model)):
        state = ScoringState(moment, PreconditionerCache(), logits_buffer=LogitsBuffer())
        ids, labels = batches[1]

        def score(scorer=scorer, state=state, ids=ids, labels=labels):
            return score_batch(
                scorer, ids, labels, settings, selections=selections, batch_key=0, state=state
            )

        reset_peak(device)
        seconds, scores = timed(device, score, args.repeats)
        losses[name] = scores.losses
        tokens = sum(len(x) for x in ids)
        check.info[f"score_{name}"] = {
            "rows": len(ids), "tokens": tokens, "seconds_per_batch": round(seconds, 4),
            "rows_per_s": round(len(ids) / seconds, 1), "tokens_per_s": round(tokens / seconds),
            "peak_mib": peak_mib(device),
        }  # fmt: skip
        check.finite(f"scoring {name} losses", scores.losses)
    e = error(losses["bf16"], losses["fp32"])
    check.info["score_bf16_losses_vs_fp32"] = e
    check.at_most("bf16 scoring losses rel err vs fp32", e["rel"], BF16_LOSS_RTOL)
    del bf16_model
    torch.manual_seed(setup.seed)
    lora = add_lora(model, 8, 16.0, 0.0, LORA_TARGETS).train()
    train_ids, train_labels = synthetic_rows(rng, args.train_batch, (256, 256), vocab)
    batch = list(zip(train_ids, train_labels, strict=True))
    runs = {
        "full": (SelectionSettings(SelectionSpec(method="full"), alpha=0.0), 4),
        "slap_kept_graphs": (SelectionSettings(SelectionSpec(method="slap"), alpha=0.3), 1),
        "slap_recompute": (
            SelectionSettings(SelectionSpec(method="slap"), alpha=0.3, onpolicy="recompute"),
            4,
        ),
    }
    for precision, autocast in (("fp32", nullcontext), ("bf16", setup.autocast)):
        for name, (settings, micro) in runs.items():
            optimizer, scheduler, ema = _trainer(lora, total_steps=100)
            trainable = [p for p in lora.parameters() if p.requires_grad]
            objectives = []

            def step(settings=settings, micro=micro, autocast=autocast, optimizer=optimizer,
                     scheduler=scheduler, ema=ema, trainable=trainable, objectives=objectives):  # fmt: skip
                stats = onpolicy_step(
                    lora, batch, range(len(batch)), len(batch), settings,
                    derive_rng(setup.seed, "bench", len(objectives)), setup.pad,
                    micro_batch_size=micro, second_moment=ema.value(), lm_head_ema=ema,
                    autocast=autocast,
                )  # fmt: skip
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                objectives.append(stats.objective)
                return stats

            reset_peak(device)
            seconds, stats = timed(device, step, args.repeats)
            check.info[f"train_{precision}_{name}"] = {
                "batch": len(batch), "tokens": sum(len(x) for x in train_ids),
                "micro_batch": micro, "step_seconds": round(seconds, 4),
                "backward_examples": stats.backward_examples, "peak_mib": peak_mib(device),
                "phase_seconds": {k: round(v, 4) for k, v in stats.seconds.items() if v},
            }  # fmt: skip
            check.finite(f"train {precision} {name} objectives", objectives)
            expected = len(batch) if settings.method == "full" else n_keep_for(len(batch), 0.3)
            check.true(f"train {precision} {name}: back-propagated rows == n_keep",
                       stats.backward_examples == expected, [stats.backward_examples, expected])  # fmt: skip


# --------------------------------------------------------------------------- main


def environment(device: torch.device) -> dict[str, Any]:
    import peft
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
    else:
        env["note"] = "no CUDA: the device is the CPU, so device-vs-CPU comparisons are exact"
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="local HF causal-LM folder")
    parser.add_argument("--out", help="also write the JSON report here")
    parser.add_argument("--no-big", action="store_true", help="skip the SmolLM2-shaped throughput")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--score-batch", type=int, default=32, help="rows per scored batch (big)")
    parser.add_argument("--train-batch", type=int, default=16, help="rows per step (big)")
    parser.add_argument("--big-layers", type=int, default=30, help="fewer: a plumbing run")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after a warm-up")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")  # plain fp32 GEMMs (no TF32) on both devices
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    report: dict[str, Any] = {"environment": environment(device), "checks": {}}
    checks = report["checks"]
    try:
        setup = Setup(args, device)
    except Exception as exc:  # nothing can run without the tokenizer and the batch
        checks["setup"] = {"passed": False, "error": f"{type(exc).__name__}: {exc}",
                           "traceback": traceback.format_exc(limit=-4)}  # fmt: skip
        report["passed"], report["failed"] = False, ["setup"]
        print(json.dumps(report, indent=1, default=_jsonable))
        return 1
    report["batch"] = {
        "rows": len(setup.ids),
        "tokens": [len(x) for x in setup.ids],
        "response_tokens": [sum(t != -100 for t in x) for x in setup.labels],
    }
    run_check(checks, "scoring_fp32", lambda c: check_scoring_fp32(c, setup))
    run_check(checks, "training_fp32", lambda c: check_training_fp32(c, setup, device))
    run_check(checks, "onpolicy_fp32", lambda c: check_onpolicy_fp32(c, setup, device))
    run_check(checks, "scoring_bf16", lambda c: check_scoring_bf16(c, setup))
    run_check(checks, "logits_buffer", lambda c: check_logits_buffer(c, setup))
    run_check(checks, "training_bf16", lambda c: check_training_bf16(c, setup, device))
    if args.no_big:
        checks["throughput"] = {"passed": True, "skipped": "--no-big"}
    else:
        run_check(checks, "throughput", lambda c: check_throughput(c, setup, device))

    def no_heavy_imports(check: Check) -> None:
        # The core must not pull in Ray or the job layer (the selection spec needs pydantic).
        for name in ("ray", "slap_ray.config", "slap_ray.assets"):
            check.true(f"{name} not imported", sys.modules.get(name) is None)

    run_check(checks, "imports", no_heavy_imports)
    failed = [name for name, entry in checks.items() if not entry["passed"]]
    report["passed"], report["failed"] = not failed, failed
    report["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=1, default=_jsonable)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    print(text)
    return 1 if failed else 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | torch.Tensor):
        return _np(value).tolist()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
