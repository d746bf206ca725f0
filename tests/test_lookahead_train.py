"""`kvgguf train-lookahead`: its prompts, its targets (read with the attention tap through llama.cpp) and its
training loop, on the real default model.

The target of an example is the mean attention the model's own answer, teacher-forced after the prompt, pays
each prompt cell per (layer, KV head), normalized over the prompt. Read with the tap, it equals transformers'
eager attention of the same tokens on the same GGUF within quantization noise: measured on five training prompts
(one of each kind, 404-1167 prompt tokens, 54-128 answer tokens; AMD EPYC), the total variation distance per
(layer, head) was at most 0.020 (median 0.005-0.008) and the KL at most 0.0018. Asserted: TV <= 0.05 everywhere,
median <= 0.02.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import kvgguf
import kvgguf.cli
from kvgguf.bench.tasks import TASKS
from kvgguf.chat import chat_prompt_tokens
from kvgguf.lookahead import TARGETS, load_module
from kvgguf.lookahead_data import HELDOUT_SEED0, KINDS, TRAIN_SEED0, make_prompt, seeds

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvgguf import train_lookahead  # noqa: E402  (needs torch at use only, but its tests need it)

TV_MAX = 0.05
TV_MEDIAN = 0.02


@pytest.fixture(scope="module")
def llm(model_path):
    model = kvgguf.Llama(model_path, n_ctx=4096, n_batch=512, n_threads=2, verbose=False, kv_head_profile=None)
    yield model
    model.close()


def count_with(llm):
    return lambda text: len(llm.tokenize(text.encode(), add_bos=False))


def test_prompts_are_deterministic_of_every_kind_and_apart_from_the_benchmarks(llm):
    count = count_with(llm)
    prompts = [make_prompt(seed, count) for seed in seeds("train", 2 * len(KINDS))]
    assert {p.kind for p in prompts} == set(KINDS)
    assert [make_prompt(p.seed, count) for p in prompts] == prompts
    for prompt in prompts:
        assert prompt.messages[-1]["role"] == "user" and prompt.messages[-1]["content"].strip()
    # train and held-out seeds never meet, and both lie above every benchmark seed (those count from 0)
    assert set(seeds("train", 10_000)).isdisjoint(seeds("heldout", 10_000))
    assert TRAIN_SEED0 >= 1_000_000 and HELDOUT_SEED0 >= 1_000_000
    assert len({p.messages[-1]["content"] for p in prompts}) == len(prompts)
    assert set(TASKS)  # the task prompts come from the benchmark's generators
    with pytest.raises(ValueError, match="split must be 'train' or 'heldout', got 'test'"):
        seeds("test", 1)


def test_the_taps_target_equals_transformers_eager_attention(llm, model_path):
    from pathlib import Path as P

    path = P(model_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    count = count_with(llm)
    n_kv, n_head = hf.config.num_key_value_heads, hf.config.num_attention_heads
    for seed in (TRAIN_SEED0 + 2, TRAIN_SEED0 + 3):  # a prose and a source prompt
        prompt = chat_prompt_tokens(llm, make_prompt(seed, count).messages)
        response = train_lookahead.greedy_response(llm, prompt, 48)
        assert response
        target = train_lookahead.response_target(llm, prompt, response)
        n = len(prompt)
        assert target.shape == (hf.config.num_hidden_layers, n_kv, n)
        assert np.allclose(target.sum(-1), 1.0, atol=1e-4)
        with torch.no_grad():
            attentions = hf(torch.tensor([prompt + response]), output_attentions=True).attentions
        reference = []
        for attention in attentions:
            mean = attention[0, :, n:, :n].mean(dim=1).view(n_kv, n_head // n_kv, n).mean(dim=1)
            reference.append((mean / mean.sum(-1, keepdim=True)).numpy())
        tv = 0.5 * np.abs(np.stack(reference) - target).sum(-1)
        assert tv.max() <= TV_MAX and np.median(tv) <= TV_MEDIAN, (tv.max(), np.median(tv))


def test_a_short_training_run_writes_a_module_and_resumes(tmp_path, model_path):
    """Two examples, two steps: the loop runs, logs, checkpoints and writes a module with every target of every
    layer; run again, it resumes from its checkpoint instead of starting over."""
    out = tmp_path / "lookahead.safetensors"
    argv = ["train-lookahead", "-m", model_path, "-o", str(out), "--n-train", "2", "--n-heldout", "1",
            "--max-response", "16", "--epochs", "2", "--batch", "2", "--eval-every", "1"]
    assert kvgguf.cli.main(argv) == 0
    module = load_module(out)
    n_layer = transformers.AutoConfig.from_pretrained(str(Path(model_path).parent),
                                                      gguf_file=Path(model_path).name).num_hidden_layers
    assert module.lora.keys() == {(layer, target) for layer in range(n_layer) for target in TARGETS}
    assert module.n_lookahead == 32 and module.rank == 8 and module.lora_alpha == 32.0
    assert any(np.abs(b).max() > 0 for _, b in module.lora.values())  # B started at zero and was trained
    log = [json.loads(line) for line in (tmp_path / "lookahead.safetensors.work" / "train.log.jsonl").open()]
    assert [record["step"] for record in log] == [0, 1, 2]
    assert (tmp_path / "lookahead.safetensors.work" / "loss.png").stat().st_size > 0
    assert all(np.isfinite(record["heldout_kl"]) and record["heldout_kl"] > 0 for record in log)

    assert kvgguf.cli.main(argv[:-6] + ["--epochs", "3", "--batch", "2", "--eval-every", "1"]) == 0
    log = [json.loads(line) for line in (tmp_path / "lookahead.safetensors.work" / "train.log.jsonl").open()]
    assert [record["step"] for record in log] == [0, 1, 2, 3]


def test_bad_settings_are_refused_in_one_line(tmp_path, model_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        kvgguf.cli.main(["train-lookahead", "-m", model_path, "-o", str(tmp_path / "x.safetensors"),
                         "--n-train", "0"])
    assert exit_info.value.code == 2
    assert "--n-train must be >= 1, got 0" in capsys.readouterr().err
