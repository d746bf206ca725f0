"""kvpress (NVIDIA's PyTorch KV-cache compression library) on the same model and the same token ids.

kvpress runs in transformers on the GGUF weights dequantized to fp32, and *prunes or masks a torch cache*; it
does not evict from llama.cpp. Putting its accuracy beside ours separates "the method" from "our implementation
of it in llama.cpp". kvpress's ``compression_ratio`` is the fraction removed: compression_ratio = 1 - kv_keep.

How the budgets differ: kvpress keeps ``int(n * (1 - ratio))`` of all n cells (its SnapKV window and
StreamingLLM sinks count inside that number); kvgguf keeps ``sink + window + ceil(keep * (n - sink - window))``.
At keep 0.5 and 1K tokens that is 512 against 530 cells. ``kvpress:kvzip-head`` / ``kvpress:kvzip-token`` (KVzip's
scores with our selections) keep exactly our budget and protect our cells.

The decoding loop mirrors kvpress's own pipeline (``kvpress/pipeline.py``): the press compresses during a
prefill, the rest of the prompt is fed with explicit position ids that continue after the *uncompressed*
length (a pruned cache is shorter than the positions it covers), then greedy decoding without compression.
Needs the ``compare`` extra: ``pip install 'kvgguf[compare]'``.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from kvpress import BasePress, KVzipPress, ScorerPress, SnapKVPress, StreamingLLMPress
from kvpress.presses import kvzip_press
from scipy.stats import spearmanr
from tqdm import tqdm

from .._native import llama_cpp_api
from ..llama import Llama
from ..policies import POLICIES
from ..head_profile import group_into_tiers, shipped_profile
from ..settings import DEFAULT_SINK, DEFAULT_WINDOW, MAX_TIERS, validate_settings
from . import report
from .accuracy import SETTINGS
from .tasks import Sample, score

logger = logging.getLogger(__name__)

SNAPKV_KERNEL = 7                       # our SnapKV's max-pool kernel; kvpress's default is 5
POSITIONAL_METHODS = frozenset({"streaming"})   # scores are positions: nothing to correlate
SCORES_RATIO = 0.5                      # a compression ratio > 0, so that the press computes scores at all
CORRELATION_THRESHOLD = 0.9             # summarize_correlations reports the fraction of pairs at or above it
FULL_CACHE_METHOD = "snapkv"            # any name: keep 1.0 runs no press
GGUF_PATH_ATTR = "kvgguf_gguf_path"     # set on the transformers model by load_hf_model
TOKENIZER_ATTR = "_kvgguf_tokenizer"    # the GGUF tokenizer, loaded on the model the first time KVzip needs it


# --- the presses ------------------------------------------------------------------------------------------------

def _snapkv_press(compression_ratio: float, window: int) -> BasePress:
    """kvpress's SnapKV: the last ``window`` prompt tokens observe the rest; scores are averaged over the window
    and the query heads of a KV group, like ours, but then *average*-pooled (kernel 7, zero padding) where ours
    max-pools. The window's own cells get max + 1, so they are always kept; sinks are not protected."""
    return SnapKVPress(compression_ratio=compression_ratio, window_size=window, kernel_size=SNAPKV_KERNEL)


def _streaming_press(compression_ratio: float, window: int) -> BasePress:
    """kvpress's StreamingLLM: the first ``DEFAULT_SINK`` cells and the most recent ones (``window`` unused)."""
    del window
    return StreamingLLMPress(compression_ratio=compression_ratio, n_sink=DEFAULT_SINK)


class _KVzipScoreMemo:
    """The last context's KVzip score table, so that one sample's answers at several kept ratios and selections
    score the context once: KVzip's scores depend on the model and the prefilled ids only (the ratio and the
    selection act after scoring). One entry: ``run_kvpress`` answers every configuration of a sample in a row."""

    def __init__(self) -> None:
        self._key: tuple[int, tuple[int, ...]] | None = None
        self._scores: torch.Tensor | None = None

    @staticmethod
    def key(model: Any, context_ids: torch.Tensor) -> tuple[int, tuple[int, ...]]:
        return id(model), tuple(int(t) for t in context_ids.reshape(-1).tolist())

    def get(self, key: tuple[int, tuple[int, ...]]) -> torch.Tensor | None:
        return self._scores.clone() if self._scores is not None and key == self._key else None

    def put(self, key: tuple[int, tuple[int, ...]], scores: torch.Tensor) -> None:
        self._key, self._scores = key, scores.detach().clone()

    def clear(self) -> None:
        self._key, self._scores = None, None


KVZIP_SCORE_MEMO = _KVzipScoreMemo()


@dataclass
class MemoKVzipPress(KVzipPress):
    """kvpress's KVzipPress, unchanged, except that a context it has just scored (same model, same ids) is not
    reconstructed again: the score table is taken from the memo and only ``compress_post`` (the selection) runs.
    Skipping the reconstruction leaves the cache as the prefill left it, which is what the reconstruction's
    forward hook restores too."""

    def _perform_kvzip_compression(self, model: Any, tokenizer: Any) -> None:
        scores = KVZIP_SCORE_MEMO.get(KVZIP_SCORE_MEMO.key(model, self._context_ids))
        if scores is None:
            super()._perform_kvzip_compression(model, tokenizer)  # reconstructs, then calls compress_post
            return
        self.context_length = self._context_ids.shape[1]
        self.score_val = scores
        self.compress_post(model)

    def compress_post(self, model: Any) -> None:
        # the table is remembered before the selection raises the sinks in place
        KVZIP_SCORE_MEMO.put(KVZIP_SCORE_MEMO.key(model, self._context_ids), self.score_val)
        self.select(model)

    def select(self, model: Any) -> None:
        """Mask the lowest-scoring cells: kvpress's own global selection."""
        super().compress_post(model)


def _kvzip_press(compression_ratio: float, window: int) -> BasePress:
    """kvpress's KVzip: after the prefill, the model is asked to repeat the prefilled context ("Repeat the
    previous context exactly." + the chat template's assistant header + the context again, in chunks of 2048
    tokens, through the same cache); each cell's score is the max attention it gets from the repeated tokens
    (over the queries and the query heads of its group). The lowest scores over *all* layers and heads are
    masked (``layerwise=False``: layers keep different numbers of cells), the chat template's prefix is never
    reconstructed, and the first DEFAULT_SINK cells are kept. The cache is masked, not pruned: masked keys are
    replaced at decode time by a key that gets zero attention (kvpress's attention patch, sdpa only). The
    press needs: sdpa attention (see load_hf_model); the prefill called as ``model.model(input_ids=...)`` or
    ``model(input_ids=...)`` inside ``with press(model)`` (it wraps ``model.model.forward`` to catch the ids and
    the cache, and scores when the block exits); a tokenizer, which it loads from ``model.config.name_or_path``
    (for a GGUF model ``_pressed`` hands it the GGUF file's tokenizer) to tokenize its repeat prompt and to
    find the chat template's prefix and assistant header. It costs about 4 plain prefills, once per context
    (MemoKVzipPress). ``window`` is unused."""
    del window
    return MemoKVzipPress(compression_ratio=compression_ratio, n_sink=DEFAULT_SINK)


@dataclass
class KVzipGranularityPress(MemoKVzipPress):
    """kvpress's KVzip scores with our selection instead of its global one, so that the two differ in the scores
    and the engine only: our budget (``EvictionSettings.target_cells`` with the chat template's prefix as the
    protected head, as our KVzip protects it, and our window) and our protected cells (that prefix, at least
    ``n_sink``, and the last ``window`` cells, in every head). ``"head"`` keeps the best of the rest in every
    (layer, KV head) alike (equal budgets, our kv_granularity="head"); ``"token"`` keeps the same cells
    everywhere, ranked by their max score over layers and heads (ours kv_granularity="token")."""

    granularity: str = "head"
    window: int = DEFAULT_WINDOW

    def select(self, model: Any) -> None:
        if self.compression_ratio <= 0:
            return
        scores = self.score_val[:, 0]  # [n_layer, n_head_kv, n_tokens] (batch 1)
        n_layer, n_head_kv, n_tokens = scores.shape
        head = max(self.n_sink, self.prefix_length)
        keep = round(1.0 - self.compression_ratio, 9)
        target = validate_settings("kvzip", kv_keep=keep, kv_window=self.window, kv_sink=head).target_cells(n_tokens)
        scores = scores.clone()
        protected = scores.amax() + 1.0
        scores[..., :head] = protected
        scores[..., n_tokens - self.window:] = protected
        n_pruned = n_tokens - target
        if self.granularity == "profile" or self.granularity.startswith("tiers"):
            self._mask_per_head(model, scores, keep, head)
            return
        if self.granularity == "token":
            pruned = torch.topk(-scores.amax(dim=(0, 1)), n_pruned).indices.cpu()
            per_head = pruned.repeat(n_layer, n_head_kv, 1)
        elif self.granularity == "head":
            per_head = torch.topk(-scores, n_pruned, dim=-1).indices.cpu()
        else:
            raise ValueError(f"granularity must be 'head', 'token', 'profile' or 'tiers<T>', got "
                             f"{self.granularity!r}")
        for layer in model.model.layers:
            module = layer.self_attn
            indices = per_head[int(module.layer_idx)]  # [n_head_kv, n_pruned]
            head_indices = torch.arange(n_head_kv).repeat_interleave(n_pruned)
            module.masked_key_indices = (torch.zeros_like(head_indices), head_indices, indices.reshape(-1))


    def _mask_per_head(self, model: Any, scores: torch.Tensor, keep: float, head: int) -> None:
        """Unequal budgets: each (layer, KV head) keeps its protected cells and the best of the rest by its share
        of the model's head profile (``"profile"``), or by that budget grouped into T tiers (``"tiers<T>"``)."""
        n_layer, n_head_kv, n_tokens = scores.shape
        profile = shipped_profile(getattr(model, GGUF_PATH_ATTR))
        if profile is None:
            raise ValueError(f"no head profile ships for {getattr(model, GGUF_PATH_ATTR)}; make one with "
                             "`kvgguf profile-heads`")
        n_evictable = n_tokens - head - self.window
        budgets = profile.budgets(keep, n_evictable)
        if self.granularity != "profile":
            budgets = group_into_tiers(budgets, int(self.granularity[len("tiers"):])).budgets()
        order = torch.argsort(scores[..., head:n_tokens - self.window], dim=-1, descending=True).cpu() + head
        for layer in model.model.layers:
            module = layer.self_attn
            layer_index = int(module.layer_idx)
            heads, cells = [], []
            for kv_head in range(n_head_kv):
                pruned = order[layer_index, kv_head, int(budgets[layer_index, kv_head]):]
                heads.append(torch.full_like(pruned, kv_head))
                cells.append(pruned)
            head_indices, cell_indices = torch.cat(heads), torch.cat(cells)
            module.masked_key_indices = (torch.zeros_like(head_indices), head_indices, cell_indices)


def _kvzip_head_press(compression_ratio: float, window: int) -> BasePress:
    """kvpress's KVzip scores, equal budgets per (layer, KV head) (see KVzipGranularityPress)."""
    return KVzipGranularityPress(compression_ratio=compression_ratio, n_sink=DEFAULT_SINK, granularity="head",
                                 window=window)


def _kvzip_token_press(compression_ratio: float, window: int) -> BasePress:
    """kvpress's KVzip scores, one decision per token (see KVzipGranularityPress)."""
    return KVzipGranularityPress(compression_ratio=compression_ratio, n_sink=DEFAULT_SINK, granularity="token",
                                 window=window)


def _kvzip_profile_press(granularity: str) -> Callable[[float, int], BasePress]:
    """kvpress's KVzip scores, unequal per-head budgets from the model's head profile (see KVzipGranularityPress)."""
    def press(compression_ratio: float, window: int) -> BasePress:
        return KVzipGranularityPress(compression_ratio=compression_ratio, n_sink=DEFAULT_SINK,
                                     granularity=granularity, window=window)
    return press


KVPRESS_METHODS: dict[str, Callable[[float, int], BasePress]] = {
    "snapkv": _snapkv_press,
    "streaming": _streaming_press,
    "kvzip": _kvzip_press,            # kvpress's own, global selection over all layers and heads
    "kvzip-head": _kvzip_head_press,  # built from its scores: our two granularities
    "kvzip-token": _kvzip_token_press,
    # the head profile's budgets (kvgguf profile-heads), unquantized and grouped into T tiers (kv_tiers)
    "kvzip-profile": _kvzip_profile_press("profile"),
    **{f"kvzip-tiers{n}": _kvzip_profile_press(f"tiers{n}") for n in range(1, MAX_TIERS + 1)},
}


def _check_method(method: str) -> None:
    if method not in KVPRESS_METHODS:
        raise ValueError(f"unknown kvpress method {method!r}; known: {sorted(KVPRESS_METHODS)}")


def _check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; known: {list(SETTINGS)}")


def _check_keep(keep: float) -> None:
    if isinstance(keep, bool) or not (isinstance(keep, (int, float)) and math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise ValueError(f"keep must be in (0, 1] (the fraction of cells kept), got {keep!r}")


def _check_length(n_prefilled: int, window: int) -> None:
    """kvpress's presses assert on prefills no longer than SnapKV's window or StreamingLLM's sinks."""
    if n_prefilled <= window + DEFAULT_SINK:
        raise ValueError(f"a compressed prefill of {n_prefilled} tokens must be longer than the window plus the "
                         f"sinks ({window} + {DEFAULT_SINK})")


def make_press(method: str, keep: float, window: int) -> BasePress | None:
    """The kvpress press for ``method`` keeping ``keep`` of the cells; None for keep == 1.0 (no press)."""
    _check_method(method)
    _check_keep(keep)
    if keep == 1.0:
        return None
    return KVPRESS_METHODS[method](1.0 - keep, window)


# --- the model --------------------------------------------------------------------------------------------------

def load_hf_model(model_path: str) -> Any:
    """transformers' model on the GGUF file's weights (dequantized to fp32), in eval mode, with sdpa attention:
    kvpress's attention patch (KVzip's masking) wraps transformers' registered attention functions, which eager
    attention is not one of. The GGUF path is kept on the model for KVzip's tokenizer."""
    path = Path(model_path)
    if not path.is_file():
        raise ValueError(f"model file not found: {model_path}")
    progress_bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # the GGUF de-quantization bar, per tensor
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa")
    finally:
        if progress_bars:
            transformers.utils.logging.enable_progress_bar()
    model.eval()
    setattr(model, GGUF_PATH_ATTR, str(path))
    return model


def _gguf_tokenizer(model: Any) -> Any:
    """The GGUF file's tokenizer, loaded once per model (KVzip tokenizes its reconstruction prompt with it)."""
    tokenizer = getattr(model, TOKENIZER_ATTR, None)
    if tokenizer is None:
        gguf_path = getattr(model, GGUF_PATH_ATTR, None)
        if gguf_path is None:
            raise ValueError("KVzip needs the model's tokenizer: load the model with load_hf_model()")
        path = Path(gguf_path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        setattr(model, TOKENIZER_ATTR, tokenizer)
    return tokenizer


class _FixedTokenizerLoader:
    """Stands in for ``AutoTokenizer`` inside kvpress's KVzip module: returns the GGUF tokenizer, whatever
    name it is asked for (KVzipPress loads ``model.config.name_or_path``, a folder with no tokenizer files)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def from_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        del args, kwargs
        return self._tokenizer


@contextmanager
def _pressed(model: Any, press: BasePress | None) -> Iterator[None]:
    """``with press(model)`` (nothing for None). For KVzip, its tokenizer lookup is pointed at the GGUF
    tokenizer for the duration; its scoring passes and masking run when the block exits."""
    if press is None:
        yield
        return
    if not isinstance(press, KVzipPress):
        with press(model):
            yield
        return
    loader = kvzip_press.AutoTokenizer
    kvzip_press.AutoTokenizer = _FixedTokenizerLoader(_gguf_tokenizer(model))
    try:
        with press(model):
            yield
    finally:
        kvzip_press.AutoTokenizer = loader


# --- greedy decoding --------------------------------------------------------------------------------------------

def _ids(tokens: list[int]) -> torch.Tensor:
    return torch.tensor([tokens], dtype=torch.long)


def _forward(model: Any, cache: transformers.DynamicCache, tokens: list[int], start: int) -> torch.Tensor:
    """Feed ``tokens`` at positions ``start...`` (whatever the cache holds) and return the last logits."""
    positions = torch.arange(start, start + len(tokens), dtype=torch.long).unsqueeze(0)
    out = model(input_ids=_ids(tokens), past_key_values=cache, position_ids=positions, logits_to_keep=1)
    return out.logits[0, -1]


def _prefill(model: Any, cache: transformers.DynamicCache, tokens: list[int], press: BasePress | None,
             logits: bool) -> torch.Tensor | None:
    """The compressing prefill; as in kvpress's pipeline, without the LM head unless the logits are wanted."""
    with _pressed(model, press):
        if logits:
            return model(input_ids=_ids(tokens), past_key_values=cache, logits_to_keep=1).logits[0, -1]
        model.model(input_ids=_ids(tokens), past_key_values=cache)
        return None


def _cells_per_head(model: Any, cache: transformers.DynamicCache) -> int | None:
    """Cells per KV head the cache attends to, averaged over layers: pruned presses shorten the cache, masking
    presses (KVzip) leave it whole and list the masked (head, cell) pairs on each attention module."""
    n_head_kv = model.config.num_key_value_heads
    kept = []
    for layer, cache_layer in zip(model.model.layers, cache.layers, strict=True):
        n_cells = cache_layer.keys.shape[2]
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        n_masked = 0 if masked is None else int(masked[0].numel())
        kept.append(n_cells - n_masked / n_head_kv)
    return round(sum(kept) / len(kept)) if kept else None


def _greedy(model: Any, cache: transformers.DynamicCache, logits: torch.Tensor, position: int, max_tokens: int,
            eos_token_ids: set[int]) -> list[int]:
    """Greedy tokens from ``logits`` on, the next one at ``position``; stops before an EOS or at max_tokens."""
    out: list[int] = []
    while len(out) < max_tokens:
        token = int(logits.argmax())
        if token in eos_token_ids:
            break
        out.append(token)
        if len(out) < max_tokens:
            logits = _forward(model, cache, [token], position)
            position += 1
    return out


def _default_eos(model: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def kvpress_answer(model: Any, context: list[int], question: list[int], method: str, keep: float, setting: str,
                   max_tokens: int = 32, window: int = 32,
                   eos_token_ids: set[int] | None = None) -> tuple[list[int], int | None]:
    """Greedy answer with kvpress's ``method`` keeping ``keep`` of the cells (1.0: no press).

    query-aware: the press compresses context + question during the prefill, whose last logits give the first
    token. query-agnostic: the press compresses ``context``; ``question`` is then fed uncompressed at the
    positions after the context. Returns the generated ids (no EOS) and the cells per KV head attended to
    after the compression.
    """
    _check_setting(setting)
    press = make_press(method, keep, window)
    if not context or not question:
        raise ValueError(f"context and question must be non-empty (got {len(context)} and {len(question)} tokens)")
    _check_length(len(context) + (len(question) if setting == "query-aware" else 0), window)
    eos = _default_eos(model) if eos_token_ids is None else eos_token_ids
    cache = transformers.DynamicCache()
    with torch.no_grad():
        if setting == "query-aware":
            prompt = context + question
            logits = _prefill(model, cache, prompt, press, logits=True)
            assert logits is not None
            cells = _cells_per_head(model, cache)
        else:
            _prefill(model, cache, context, press, logits=False)
            cells = _cells_per_head(model, cache)
            logits = _forward(model, cache, question, len(context))
        return _greedy(model, cache, logits, len(context) + len(question), max_tokens, eos), cells


# --- scores -----------------------------------------------------------------------------------------------------

def _capture_scores(press: BasePress, captured: dict[int, np.ndarray]) -> None:
    """Record, per layer, the scores ``press`` computes: a ScorerPress's ``score`` return value
    ([n_head_kv, n_tokens]), or KVzip's score table just before it is turned into a mask (its chat-template
    prefix is left at 0, the sinks are not yet raised)."""
    if isinstance(press, ScorerPress):
        score_fn = press.score

        def recording_score(module: Any, *args: Any) -> torch.Tensor:
            scores = score_fn(module, *args)
            captured[int(module.layer_idx)] = scores[0].detach().to(torch.float32).cpu().numpy().copy()
            return scores

        press.score = recording_score  # type: ignore[method-assign]
    elif isinstance(press, KVzipPress):
        compress_post = press.compress_post

        def recording_compress_post(model: Any) -> None:
            # a copy: compress_post raises the sinks in place  [n_layer, 1, n_head_kv, n_tokens]
            table = press.score_val.detach().to(torch.float32).cpu().numpy().copy()
            captured.update({il: table[il, 0] for il in range(table.shape[0])})
            compress_post(model)

        press.compress_post = recording_compress_post  # type: ignore[method-assign]
    else:
        raise TypeError(f"cannot capture the scores of {type(press).__name__}")


def kvpress_scores(model: Any, tokens: list[int], method: str, window: int = 32) -> np.ndarray:
    """The scores kvpress's ``method`` gives a prefill of ``tokens``: [n_layer, n_head_kv, n_tokens] float32,
    higher = more worth keeping (SnapKV's window cells carry its "always keep" value: max + 1)."""
    press = make_press(method, 1.0 - SCORES_RATIO, window)
    assert press is not None
    _check_length(len(tokens), window)
    captured: dict[int, np.ndarray] = {}
    _capture_scores(press, captured)
    with torch.no_grad():
        _prefill(model, transformers.DynamicCache(), tokens, press, logits=False)
    n_layer = model.config.num_hidden_layers
    if sorted(captured) != list(range(n_layer)):
        raise RuntimeError(f"kvpress {method!r} scored layers {sorted(captured)}, expected 0..{n_layer - 1}")
    return np.stack([captured[il] for il in range(n_layer)]).astype(np.float32)


def _our_scores(model_path: str, tokens: list[int], method: str, window: int, threads: int) -> np.ndarray:
    """kvgguf's scores of the eviction after prefilling ``tokens``: [n_layer, n_head_kv, n_tokens]."""
    llm = Llama(model_path, n_ctx=report.cells_for([method], len(tokens) + 64), n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False, kv_eviction=method, kv_keep=0.5, kv_window=window,
                kv_head_profile=None)
    try:
        llm.prefill(tokens)
        result = llm.kv_scores()
    finally:
        llm.close()
    if result is None:
        raise RuntimeError(f"kvgguf's {method!r} did not evict after a prefill of {len(tokens)} tokens")
    positions, scores = result["positions"], result["scores"]
    if not np.array_equal(positions, np.arange(len(tokens))) or scores.ndim != 3:
        raise RuntimeError(f"kvgguf's {method!r} scores are not per (layer, head) over every prompt position "
                           f"(positions {positions.size}, shape {scores.shape})")
    return scores


def _correlation_methods(methods: list[str]) -> list[str]:
    """The methods with per-cell scores on both sides; ValueError for a name either side lacks."""
    chosen = []
    for method in methods:
        _check_method(method)
        if method in POSITIONAL_METHODS:
            logger.info("skipping %r: its scores are positions, not per-cell importance", method)
            continue
        if method not in POLICIES:
            raise ValueError(f"kvgguf has no {method!r} policy to correlate with kvpress; known: {sorted(POLICIES)}")
        chosen.append(method)
    return chosen


def score_correlations(model_path: str, tokens: list[int], methods: list[str], window: int = 32,
                       threads: int = 2) -> list[dict[str, Any]]:
    """Spearman correlation of kvgguf's and kvpress's scores per (method, layer, KV head), over the cells both
    may evict and both score: after the first DEFAULT_SINK cells (and the chat-template prefix that kvpress's
    KVzip does not score) and before the last ``window`` (positional methods skipped).
    """
    chosen = _correlation_methods(methods)
    if len(tokens) <= DEFAULT_SINK + window + 2:
        raise ValueError(f"{len(tokens)} tokens leave no cells to compare outside {DEFAULT_SINK} sinks and a "
                         f"window of {window}")
    if not chosen:
        return []
    model = load_hf_model(model_path)
    rows = []
    for method in chosen:
        ours = _our_scores(model_path, tokens, method, window, threads)
        theirs = kvpress_scores(model, tokens, method, window)
        if ours.shape != theirs.shape:
            raise RuntimeError(f"{method!r}: kvgguf scores {ours.shape} vs kvpress {theirs.shape}")
        # kvpress's KVzip leaves the chat template's prefix unscored (0): compare from its first scored cell
        scored = np.nonzero(theirs.max(axis=(0, 1)) > 0)[0]
        first = max(DEFAULT_SINK, int(scored[0]) if scored.size else 0)
        compared = slice(first, len(tokens) - window)
        for il, head in itertools.product(range(ours.shape[0]), range(ours.shape[1])):
            a, b = ours[il, head, compared], theirs[il, head, compared]
            rows.append({"method": method, "layer": il, "head": head,
                         "spearman": float(spearmanr(a, b).statistic), "n_cells": int(a.size)})
    return rows


def summarize_correlations(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: mean, median and min Spearman over (layer, head), and the fraction of pairs >= 0.9
    (NaN correlations, from constant scores, count as below)."""
    summary = []
    for method in sorted({row["method"] for row in rows}):
        values = np.array([row["spearman"] for row in rows if row["method"] == method], dtype=np.float64)
        summary.append({"method": method, "mean": float(np.nanmean(values)), "median": float(np.nanmedian(values)),
                        "min": float(np.nanmin(values)), "n_pairs": int(values.size),
                        "frac_ge_0_9": float(np.mean(np.nan_to_num(values, nan=-1.0) >= CORRELATION_THRESHOLD))})
    return summary


# --- the accuracy benchmark's rows ------------------------------------------------------------------------------

def eog_token_ids(model_path: str) -> set[int]:
    """The ids llama.cpp ends generation at (what ``accuracy.answer`` stops on), read from the GGUF vocab."""
    llama_cpp_api.llama_backend_init()
    params = llama_cpp_api.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp_api.llama_model_load_from_file(model_path.encode(), params)
    if not model:
        raise ValueError(f"llama.cpp could not read the vocabulary of {model_path}")
    try:
        vocab = llama_cpp_api.llama_model_get_vocab(model)
        n_vocab = llama_cpp_api.llama_vocab_n_tokens(vocab)
        return {i for i in range(n_vocab) if llama_cpp_api.llama_vocab_is_eog(vocab, i)}
    finally:
        llama_cpp_api.llama_model_free(model)


def run_kvpress(model_path: str, jobs: list[tuple[Sample, list[int], list[int]]], methods: list[str],
                keeps: list[float], settings: list[str], max_tokens: int, detokenize: Callable[[list[int]], str],
                progress: tqdm | None = None) -> list[dict[str, Any]]:
    """kvpress's answers for (sample, context tokens, question tokens) jobs, as rows of ``accuracy.run``'s
    schema; policy "kvpress:<method>", or "kvpress:full" for keep 1.0 (once per job and setting)."""
    for method in methods:
        _check_method(method)
    for setting in settings:
        _check_setting(setting)
    for keep in keeps:
        _check_keep(keep)
    configs = [("full", 1.0)] if 1.0 in keeps else []
    configs += [(method, keep) for method, keep in itertools.product(methods, keeps) if keep < 1.0]
    model = load_hf_model(model_path)
    eos = eog_token_ids(model_path)
    rows = []
    for sample, context, question in jobs:
        for method, keep in configs:
            # the full cache is the same computation in both settings: answered once, recorded for each
            for setting in settings[:1] if method == "full" else settings:
                name = FULL_CACHE_METHOD if method == "full" else method
                tokens, cells = kvpress_answer(model, context, question, name, keep, setting,
                                               max_tokens=max_tokens, eos_token_ids=eos)
                output = detokenize(tokens)
                if progress is not None:
                    progress.update()
                for recorded in settings if method == "full" else [setting]:
                    rows.append({"task": sample.task, "length": sample.n_tokens_target, "seed": sample.seed,
                                 "policy": f"kvpress:{method}", "keep": keep, "setting": recorded,
                                 "score": score(sample, output), "output": output,
                                 "prompt_tokens": len(context) + len(question),
                                 "cells_after_eviction": cells if method != "full" else None})
    return rows


def kvpress_version() -> str:
    from importlib import metadata

    return metadata.version("kvpress")
