"""Train a LookaheadKV module for a GGUF model on the CPU: ``kvgguf train-lookahead -m model.gguf -o
lookahead.safetensors``. Read it top to bottom: settings, data, model, training, output.

1. **Data** (llama.cpp, through kvgguf): for each prompt of ``kvgguf.lookahead_data`` the model's own greedy
   answer (at most ``--max-response`` tokens), then that answer teacher-forced after the prompt with the
   attention tap on its rows: the mean attention the answer's tokens pay each prompt cell, per (layer, KV head)
   (the query heads of a group averaged), normalized over the prompt. That is the target. Each example is
   cached in ``--work-dir`` as it is made, so a stopped run resumes where it stopped.
2. **Model** (torch, transformers reading the same GGUF, frozen): ``n_lookahead`` embeddings appended after the
   prompt and a LoRA on q, k, v, o, gate, up, down of every layer, on at the lookahead rows only: the prompt's
   K/V are computed once per step without gradients (the base model's, as at run time), then only the lookahead
   rows run with gradients, their attention read from the eager attention.
3. **Training**: KL(target || prediction) over the prompt's cells, averaged over layers and KV heads, AdamW over
   the embeddings and the LoRA weights, the held-out KL logged every ``--eval-every`` steps (``train.log.jsonl``
   in the work dir), a checkpoint every ``--checkpoint-every`` steps to resume from.
4. **Output**: ``lookahead.safetensors`` (layout: ``kvgguf/lookahead.py``), to be converted with ``kvgguf
   convert lookahead``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .lookahead import LORA_ALPHA, LORA_RANK, N_LOOKAHEAD, POOL_KERNEL, TARGETS, LookaheadModule
from .lookahead_data import make_prompt, seeds

logger = logging.getLogger(__name__)

LOOP_TOKENS = 32  # an answer whose last this many tokens appeared before in it has started to loop: it ends there

# --- settings -------------------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    model: str
    output: str
    work_dir: str
    n_train: int = 480
    n_heldout: int = 48
    max_response: int = 512
    n_lookahead: int = N_LOOKAHEAD
    rank: int = LORA_RANK
    alpha: float = LORA_ALPHA
    epochs: int = 2
    batch: int = 8               # examples per optimizer step (gradients accumulated)
    lr: float = 2e-3
    warmup: int = 10             # steps
    eval_every: int = 25
    checkpoint_every: int = 25
    threads: int = 2
    seed: int = 0


# --- 1. data ----------------------------------------------------------------------------------------------------


def response_target(llm: Any, prompt: list[int], response: list[int]) -> npt.NDArray[np.float32]:
    """The mean attention that ``response``, teacher-forced after ``prompt``, pays each prompt cell: [n_layer,
    n_head_kv, len(prompt)], the query heads of each KV group averaged, each (layer, head) summing to 1 over the
    prompt. Read with the attention tap (llama.cpp), the cache left holding ``prompt``."""
    from ._native import llama_cpp_api
    from .scoring import TapSpec

    n = len(prompt)
    if llm.n_tokens >= n and llm.input_ids[:n].tolist() == list(prompt):
        # the prompt is cached already (its answer was just generated): keep it, drop what follows
        llm.n_tokens = n
        llama_cpp_api.llama_memory_seq_rm(llama_cpp_api.llama_get_memory(llm.ctx), -1, n, -1)
    else:
        llm.reset()
        llm.eval(prompt)
    scoring = llm.kv_controller.scoring
    try:
        attention = scoring.decode(response, tap=TapSpec(rows="mean", heads="mean"))
    finally:
        scoring.finish()
    assert attention is not None and attention.shape[2] == len(prompt)
    return normalized(attention)


def normalized(attention: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    total = attention.sum(axis=-1, keepdims=True)
    return (attention / np.maximum(total, 1e-30)).astype(np.float32)


def greedy_response(llm: Any, prompt: list[int], max_tokens: int) -> list[int]:
    """The model's greedy answer to ``prompt``: up to its end of turn, ``max_tokens``, or the point where it
    repeats itself (its last ``LOOP_TOKENS`` tokens seen before in the answer: a small model's greedy decoding
    then loops to the limit, and the loop's attention repeats what the target has)."""
    from .chat import greedy_tokens

    response: list[int] = []
    seen: set[tuple[int, ...]] = set()
    for token in greedy_tokens(llm, prompt):
        response.append(token)
        if len(response) >= max_tokens:
            break
        if len(response) > LOOP_TOKENS:
            seen.add(tuple(response[-LOOP_TOKENS - 1:-1]))
            if tuple(response[-LOOP_TOKENS:]) in seen:
                break
    return response


def make_examples(settings: TrainSettings, split: str, n: int) -> list[Path]:
    """The cached examples of ``split`` (made where missing): prompt, response and target per file."""
    from tqdm import tqdm

    from . import Llama
    from .chat import chat_prompt_tokens

    folder = Path(settings.work_dir) / split
    folder.mkdir(parents=True, exist_ok=True)
    wanted = [(seed, folder / f"{seed}.npz") for seed in seeds(split, n)]
    missing = [(seed, path) for seed, path in wanted if not path.exists() and not path.with_suffix(".skip").exists()]
    if missing:
        n_ctx = 4096
        llm = Llama(settings.model, n_ctx=n_ctx, n_batch=512, n_threads=settings.threads, verbose=False,
                    kv_head_profile=None)
        count = lambda text: len(llm.tokenize(text.encode(), add_bos=False))  # noqa: E731
        try:
            for seed, path in tqdm(missing, desc=f"lookahead data ({split})", unit="example"):
                prompt = chat_prompt_tokens(llm, make_prompt(seed, count).messages)
                response = greedy_response(llm, prompt, min(settings.max_response, n_ctx - len(prompt) - 1))
                if not response:  # the model ends its turn at once: nothing attends
                    path.with_suffix(".skip").write_text("empty response\n")
                    continue
                target = response_target(llm, prompt, response)
                np.savez(path, prompt=np.asarray(prompt, np.int32), response=np.asarray(response, np.int32),
                         target=target.astype(np.float16))
        finally:
            llm.close()
    return [path for _, path in wanted if path.exists()]


# --- 2. model -----------------------------------------------------------------------------------------------------


def build_model(settings: TrainSettings) -> tuple[Any, Any, dict[tuple[int, str], Any]]:
    """The frozen base model (eager attention, float32), the lookahead embeddings and the LoRA modules."""
    import torch
    import transformers

    path = Path(settings.model)
    transformers.utils.logging.disable_progress_bar()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32, attn_implementation="eager")
    base.eval()
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(settings.seed)
    token_embeddings = base.get_input_embeddings().weight
    embeddings = torch.nn.Parameter(torch.randn(settings.n_lookahead, token_embeddings.shape[1],
                                                generator=generator) * token_embeddings.std())
    loras = {}
    for layer_index, layer in enumerate(base.model.layers):
        for target in TARGETS:
            block = layer.self_attn if hasattr(layer.self_attn, target) else layer.mlp
            wrapped = LoRALinear(getattr(block, target), settings.rank, settings.alpha, generator)
            setattr(block, target, wrapped)
            loras[(layer_index, target)] = wrapped
    return base, embeddings, loras


def _lora_linear_class() -> type:
    import torch

    class _LoRALinear(torch.nn.Module):
        """A frozen linear layer plus ``alpha / rank * B @ A``, added only while ``enabled``."""

        def __init__(self, linear: Any, rank: int, alpha: float, generator: Any) -> None:
            super().__init__()
            self.linear = linear
            self.scale = alpha / rank
            self.enabled = False
            # as PEFT initializes it: A small and random, B zero (the module starts as the base model)
            bound = 1.0 / math.sqrt(linear.in_features)
            self.lora_a = torch.nn.Parameter((torch.rand(rank, linear.in_features, generator=generator) * 2 - 1)
                                             * bound)
            self.lora_b = torch.nn.Parameter(torch.zeros(linear.out_features, rank))

        def forward(self, x: Any) -> Any:
            y = self.linear(x)
            if self.enabled:
                y = y + (x @ self.lora_a.T @ self.lora_b.T) * self.scale
            return y

    return _LoRALinear


def LoRALinear(linear: Any, rank: int, alpha: float, generator: Any) -> Any:  # noqa: N802 (a class, built lazily)
    return _lora_linear_class()(linear, rank, alpha, generator)


def set_lora(loras: dict[tuple[int, str], Any], enabled: bool) -> None:
    for module in loras.values():
        module.enabled = enabled


def prompt_kv(base: Any, loras: dict[tuple[int, str], Any], prompt: Any) -> list[tuple[Any, Any]]:
    """The base model's K and V of ``prompt`` per layer ([1, n_head_kv, n_prompt, head_dim] each), without
    gradients and with the LoRA off (the prompt is the plain model's, as at run time)."""
    import torch

    set_lora(loras, False)
    base.set_attn_implementation("sdpa")  # the prompt's pass needs no attention weights: the faster kernel
    try:
        with torch.no_grad():
            cache = base(input_ids=prompt[None], use_cache=True).past_key_values
    finally:
        base.set_attn_implementation("eager")
    return [(layer.keys, layer.values) for layer in cache.layers]


def lookahead_attention(base: Any, embeddings: Any, loras: dict[tuple[int, str], Any],
                        kv: list[tuple[Any, Any]]) -> Any:
    """[n_layer, n_head_kv, n_prompt]: the lookahead rows' mean attention to the prompt whose K/V are ``kv``, the
    query heads of each KV group averaged, normalized over the prompt (differentiable in the embeddings and the
    LoRA)."""
    import torch
    import transformers

    n_prompt = kv[0][0].shape[2]
    cache = transformers.DynamicCache()
    for layer, (keys, values) in enumerate(kv):
        cache.update(keys.float(), values.float(), layer)
    set_lora(loras, True)
    try:
        positions = torch.arange(n_prompt, n_prompt + embeddings.shape[0])[None]
        out = base.model(inputs_embeds=embeddings[None], past_key_values=cache, position_ids=positions,
                         use_cache=True, output_attentions=True)
    finally:
        set_lora(loras, False)
    config = base.config
    n_kv = config.num_key_value_heads
    rows = []
    for attention in out.attentions:  # [1, n_head, n_lookahead, n_prompt + n_lookahead]
        mean = attention[0, :, :, :n_prompt].mean(dim=1)                  # [n_head, n_prompt]
        mean = mean.view(n_kv, config.num_attention_heads // n_kv, n_prompt).mean(dim=1)
        rows.append(mean / mean.sum(dim=-1, keepdim=True).clamp_min(1e-30))
    return torch.stack(rows)


def kl_loss(target: Any, prediction: Any) -> Any:
    """KL(target || prediction) over the prompt's cells, averaged over layers and KV heads."""
    import torch

    eps = 1e-8
    return (target * (torch.log(target + eps) - torch.log(prediction + eps))).sum(dim=-1).mean()


# --- 3. training --------------------------------------------------------------------------------------------------


def load_example(path: Path, base: Any, loras: dict[tuple[int, str], Any]) -> tuple[list[tuple[Any, Any]], Any]:
    """An example's prompt K/V and target. The K/V are computed once and kept beside the example (float16, as
    llama.cpp caches them): later epochs and evaluations read them instead of running the prompt again."""
    import torch

    with np.load(path) as data:
        prompt, target = data["prompt"].astype(np.int64), data["target"].astype(np.float32)
    kv_path = path.with_suffix(".kv.pt")
    kv = None
    if kv_path.exists():
        try:
            kv = torch.load(kv_path)
        except (OSError, RuntimeError, EOFError):  # a file cut short by a stopped run: made again
            kv = None
    if kv is None:
        kv = [(k.half(), v.half()) for k, v in prompt_kv(base, loras, torch.from_numpy(prompt))]
        torch.save(kv, kv_path.with_suffix(".tmp"))
        os.replace(kv_path.with_suffix(".tmp"), kv_path)
    return kv, torch.from_numpy(target)


def evaluate(base: Any, embeddings: Any, loras: dict[tuple[int, str], Any], paths: list[Path]) -> float:
    import torch

    losses = []
    with torch.no_grad():
        for path in paths:
            kv, target = load_example(path, base, loras)
            losses.append(float(kl_loss(target, lookahead_attention(base, embeddings, loras, kv))))
    return float(np.mean(losses)) if losses else float("nan")


def train(settings: TrainSettings) -> Path:
    import torch
    from tqdm import tqdm

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    work = Path(settings.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "settings.json").write_text(json.dumps(asdict(settings), indent=2))
    t0 = time.perf_counter()
    train_paths = make_examples(settings, "train", settings.n_train)
    heldout_paths = make_examples(settings, "heldout", settings.n_heldout)
    data_s = time.perf_counter() - t0
    logger.info("%d training and %d held-out examples (%.0f s)", len(train_paths), len(heldout_paths), data_s)

    base, embeddings, loras = build_model(settings)
    parameters = [embeddings] + [p for module in loras.values() for p in (module.lora_a, module.lora_b)]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=0.0)
    steps_per_epoch = max(1, len(train_paths) // settings.batch)
    n_steps = settings.epochs * steps_per_epoch

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to a tenth
        if step < settings.warmup:
            return settings.lr * (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, n_steps - settings.warmup)
        return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    checkpoint = work / "checkpoint.pt"
    log_path = work / "train.log.jsonl"
    step = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        with torch.no_grad():
            for parameter, saved in zip(parameters, state["parameters"]):
                parameter.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        logger.info("resumed from %s at step %d of %d", checkpoint, step, n_steps)
    elif log_path.exists():
        log_path.unlink()

    def log(record: dict[str, Any]) -> None:
        with log_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    if step == 0:
        log({"step": 0, "heldout_kl": evaluate(base, embeddings, loras, heldout_paths),
             "seconds": time.perf_counter() - t0})
    order = list(range(len(train_paths)))
    progress = tqdm(total=n_steps, initial=step, desc="train-lookahead", unit="step")
    while step < n_steps:
        epoch, index = divmod(step, steps_per_epoch)
        random.Random(settings.seed * 1000 + epoch).shuffle(order)
        batch_paths = [train_paths[i] for i in order[index * settings.batch:(index + 1) * settings.batch]]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad()
        total = 0.0
        for path in batch_paths:
            kv, target = load_example(path, base, loras)
            loss = kl_loss(target, lookahead_attention(base, embeddings, loras, kv)) / len(batch_paths)
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        step += 1
        progress.update(1)
        progress.set_postfix(kl=f"{total:.4f}")
        record: dict[str, Any] = {"step": step, "train_kl": total, "lr": lr_at(step - 1),
                                  "seconds": time.perf_counter() - t0}
        if step % settings.eval_every == 0 or step == n_steps:
            record["heldout_kl"] = evaluate(base, embeddings, loras, heldout_paths)
        log(record)
        if step % settings.checkpoint_every == 0 or step == n_steps:
            torch.save({"parameters": [p.detach().clone() for p in parameters],
                        "optimizer": optimizer.state_dict(), "step": step}, checkpoint)
    progress.close()

    # --- 4. output ------------------------------------------------------------------------------------------------
    from .contexts import file_fingerprint
    from .lookahead import BaseModel

    model = BaseModel.read(settings.model)
    module = LookaheadModule(
        embeddings=embeddings.detach().numpy().astype(np.float32),
        lora={key: (m.lora_a.detach().numpy().astype(np.float32), m.lora_b.detach().numpy().astype(np.float32))
              for key, m in loras.items()},
        lora_alpha=settings.alpha, pool_kernel=POOL_KERNEL,
        base={"architecture": model.architecture, "name": model.name,
              "fingerprint": file_fingerprint(settings.model)})
    out = module.save(settings.output)
    plot_log(log_path, work / "loss.png")
    logger.info("wrote %s (%.0f s in all; the loss curve in %s)", out, time.perf_counter() - t0, work / "loss.png")
    return out


def plot_log(log_path: Path, png: Path) -> None:
    """The training and held-out KL of ``train.log.jsonl`` against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["train_kl"]) for r in records if "train_kl" in r]
    heldout = [(r["step"], r["heldout_kl"]) for r in records if "heldout_kl" in r]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    if train:
        axes.plot(*zip(*train), label="training batch", alpha=0.6)
    if heldout:
        axes.plot(*zip(*heldout), marker="o", label="held-out")
    axes.set_xlabel("step")
    axes.set_ylabel("KL(target || lookahead)")
    axes.set_title("LookaheadKV training")
    axes.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)


# --- the command ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .models import MODEL_HELP

    defaults = TrainSettings(model="", output="", work_dir="")
    parser.add_argument("-m", "--model", help=MODEL_HELP)
    parser.add_argument("-o", "--output", required=True, help="the lookahead.safetensors to write")
    parser.add_argument("--work-dir", help="where examples, checkpoints and the log go (default: next to the "
                                           "output, <output>.work)")
    for name in ("n_train", "n_heldout", "max_response", "epochs", "batch", "eval_every", "checkpoint_every",
                 "threads", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--lr", type=float, default=defaults.lr)


def main(args: argparse.Namespace) -> int:
    from .models import resolve_model

    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        raise ValueError(f"train-lookahead needs torch and transformers: install kvgguf's [train] extra "
                         f"(bash scripts/install.sh train); {error}") from None
    for name in ("n_train", "n_heldout", "max_response", "epochs", "batch", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    settings = TrainSettings(model=str(resolve_model(args.model)), output=args.output,
                             work_dir=args.work_dir or f"{args.output}.work",
                             **{name: getattr(args, name) for name in (
                                 "n_train", "n_heldout", "max_response", "epochs", "batch", "eval_every",
                                 "checkpoint_every", "threads", "seed", "lr")})
    os.makedirs(Path(settings.output).resolve().parent, exist_ok=True)
    print(train(settings))
    return 0
