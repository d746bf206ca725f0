"""`kvgguf convert lookahead`: a LookaheadKV module (embeddings + LoRA in the Hugging Face layout) into the LoRA
adapter GGUF that the patched llama.cpp loads, with the embeddings and metadata beside it (patch 0015).

The modules here are generated (random weights of the default model's shapes): what is checked is the file, not
a training. The LoRA's effect on llama.cpp's logits is compared with the same update merged into transformers'
weights on the same GGUF: their logit deltas correlate 0.979 with q and k (the rows the converter reorders for
llama.cpp's RoPE layout; without the reorder, -0.21) and 0.996 on all seven targets (measured on the default
model, AMD EPYC; llama.cpp's quantized matmuls make its plain logits differ from transformers' by up to 1.5).
"""
from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np
import pytest

import kvgguf
import kvgguf.cli
from kvgguf.convert.lookahead import convert, rope_permute
from kvgguf.gguf_py import gguf_module
from kvgguf.lookahead import (EMBEDDING_TENSOR, TARGETS, BaseModel, LookaheadFile, LookaheadModule,
                              LookaheadModuleError, load_module)
from kvgguf.scoring import LoraAdapter

RANK = 8
ALPHA = 32.0
DELTA_CORRELATION = 0.95  # measured 0.979 (q, k), 0.996 (all); -0.21 with the rows of q, k not reordered


@pytest.fixture(scope="module")
def base(model_path) -> BaseModel:
    return BaseModel.read(model_path)


def random_module(base: BaseModel, targets=tuple(TARGETS), seed: int = 0, scale: float = 0.05,
                  n_lookahead: int = 32) -> LookaheadModule:
    rng = np.random.default_rng(seed)
    lora = {}
    for layer in range(base.n_layer):
        for target in targets:
            n_in, n_out = base.shapes[f"blk.{layer}.{TARGETS[target]}.weight"]
            lora[(layer, target)] = ((rng.standard_normal((RANK, n_in)) * scale).astype(np.float32),
                                     (rng.standard_normal((n_out, RANK)) * scale).astype(np.float32))
    embeddings = (rng.standard_normal((n_lookahead, base.n_embd)) * 0.02).astype(np.float32)
    return LookaheadModule(embeddings=embeddings, lora=lora, lora_alpha=ALPHA,
                           base={"architecture": base.architecture, "name": base.name})


def gguf_tensors(path) -> dict[str, np.ndarray]:
    reader = gguf_module().GGUFReader(str(path))
    return {t.name: np.array(t.data).reshape([int(n) for n in reversed(t.shape)]) for t in reader.tensors}


def test_round_trip_every_tensor_equals_the_module(tmp_path, model_path, base):
    module = random_module(base)
    module.save(tmp_path / "lookahead.safetensors")
    loaded = load_module(tmp_path / "lookahead.safetensors")
    assert loaded.lora.keys() == module.lora.keys() and loaded.lora_alpha == ALPHA
    out = convert(tmp_path / "lookahead.safetensors", model_path, tmp_path / "lookahead.gguf")

    tensors = gguf_tensors(out)
    assert np.array_equal(tensors.pop(EMBEDDING_TENSOR), module.embeddings)
    assert len(tensors) == 2 * len(module.lora)
    for (layer, target), (a, b) in module.lora.items():
        name = f"blk.{layer}.{TARGETS[target]}.weight"
        assert np.array_equal(tensors[f"{name}.lora_a"], a)
        if target in ("q_proj", "k_proj"):  # llama: rows of q and k in llama.cpp's RoPE order
            b = rope_permute(b, base.n_head if target == "q_proj" else base.n_head_kv)
        assert np.array_equal(tensors[f"{name}.lora_b"], b)
    # the permutation moves rows (it is not the identity for these heads)
    _, b_q = module.lora[(0, "q_proj")]
    assert not np.array_equal(rope_permute(b_q, base.n_head), b_q)

    converted = LookaheadFile.load(out)
    assert (converted.n_lookahead, converted.rank, converted.pool_kernel) == (32, RANK, 7)
    assert converted.targets == tuple(TARGETS)
    converted.check_model(base)


def test_a_peft_folder_converts_to_the_same_file(tmp_path, model_path, base):
    from safetensors.numpy import save_file

    module = random_module(base, targets=("q_proj", "v_proj", "down_proj"), seed=1)
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA, "peft_type": "LORA",
                                                            "target_modules": ["q_proj", "v_proj", "down_proj"]}))
    weights = {}
    for (layer, target), (a, b) in module.lora.items():
        block = "mlp" if target == "down_proj" else "self_attn"
        key = f"base_model.model.model.layers.{layer}.{block}.{target}"
        weights[f"{key}.lora_A.weight"], weights[f"{key}.lora_B.weight"] = a, b
    save_file(weights, str(folder / "adapter_model.safetensors"))
    save_file({"embeddings": module.embeddings}, str(folder / "lookahead_embeddings.safetensors"))
    module.save(tmp_path / "lookahead.safetensors")

    from_peft = gguf_tensors(convert(folder, model_path, tmp_path / "peft.gguf"))
    from_ours = gguf_tensors(convert(tmp_path / "lookahead.safetensors", model_path, tmp_path / "ours.gguf"))
    assert from_peft.keys() == from_ours.keys()
    for name in from_ours:
        assert np.array_equal(from_peft[name], from_ours[name]), name


@pytest.mark.parametrize("targets", [("q_proj", "k_proj"), tuple(TARGETS)], ids=["q-k", "all"])
def test_llama_cpp_applies_the_lora_as_transformers_does(tmp_path, model_path, base, targets):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    module = random_module(base, targets=targets, seed=2)
    module.save(tmp_path / "m.safetensors")
    out = convert(tmp_path / "m.safetensors", model_path, tmp_path / "m.gguf")

    llm = kvgguf.Llama(model_path, n_ctx=256, logits_all=True, n_threads=2, verbose=False)
    tokens = llm.tokenize(b"The quick brown fox jumps over the lazy dog because it wanted to see the river.")
    adapter = LoraAdapter(llm.model, out)
    try:
        llm.reset()
        llm.eval(tokens)
        plain = np.array(llm.scores[:len(tokens)])
        set_adapters(llm, [(adapter.adapter, 1.0)])
        llm.reset()
        llm.eval(tokens)
        with_lora = np.array(llm.scores[:len(tokens)])
        set_adapters(llm, [])
    finally:
        adapter.close()
        llm.close()

    path = Path(model_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        hf_plain = hf(torch.tensor([tokens])).logits[0].numpy()
        for (layer, target), (a, b) in module.lora.items():
            block = hf.model.layers[layer].self_attn if target in ("q_proj", "k_proj", "v_proj", "o_proj") \
                else hf.model.layers[layer].mlp
            getattr(block, target).weight += torch.from_numpy(ALPHA / RANK * b @ a)
        hf_lora = hf(torch.tensor([tokens])).logits[0].numpy()
    ours, theirs = (with_lora - plain).ravel(), (hf_lora - hf_plain).ravel()
    assert np.abs(theirs).mean() > 0.1  # the update changes the logits
    assert np.corrcoef(ours, theirs)[0, 1] >= DELTA_CORRELATION


def set_adapters(llm, adapters) -> None:
    from kvgguf._native import llama_cpp_api as C

    handles = (C.llama_adapter_lora_p_ctypes * max(1, len(adapters)))(*[a for a, _ in adapters])
    scales = (ctypes.c_float * max(1, len(adapters)))(*[s for _, s in adapters])
    assert C.llama_set_adapters_lora(llm.ctx, handles if adapters else None, len(adapters),
                                     scales if adapters else None) == 0


def test_bad_modules_are_refused_by_name(tmp_path, model_path, base):
    module = random_module(base, targets=("q_proj",), seed=3)

    # a missing tensor
    broken = dict(module.tensors())
    del broken["layers.4.q_proj.lora_b"]
    from safetensors.numpy import save_file

    save_file(broken, str(tmp_path / "missing.safetensors"), metadata=module.metadata())
    with pytest.raises(LookaheadModuleError, match=r"layers\.4\.q_proj has no lora_b"):
        load_module(tmp_path / "missing.safetensors")

    # a wrong shape: another model's layer width
    a, b = module.lora[(2, "q_proj")]
    wrong = LookaheadModule(embeddings=module.embeddings, lora={**module.lora, (2, "q_proj"): (a, b[:-64])},
                            base=module.base)
    wrong.save(tmp_path / "wrong.safetensors")
    with pytest.raises(LookaheadModuleError, match=r"layers\.2\.q_proj: .*blk\.2\.attn_q\.weight"):
        convert(tmp_path / "wrong.safetensors", model_path, tmp_path / "wrong.gguf")

    # more layers than the model has, embeddings of another width, a module made for another architecture
    deep = LookaheadModule(embeddings=module.embeddings, lora={**module.lora, (base.n_layer, "q_proj"): (a, b)})
    deep.save(tmp_path / "deep.safetensors")
    with pytest.raises(LookaheadModuleError, match=f"layer {base.n_layer}, .* has {base.n_layer} layers"):
        convert(tmp_path / "deep.safetensors", model_path, tmp_path / "deep.gguf")
    narrow = LookaheadModule(embeddings=module.embeddings[:, :100], lora=module.lora)
    narrow.save(tmp_path / "narrow.safetensors")
    with pytest.raises(LookaheadModuleError, match=f"100 values per row, .* n_embd = {base.n_embd}"):
        convert(tmp_path / "narrow.safetensors", model_path, tmp_path / "narrow.gguf")
    qwen = LookaheadModule(embeddings=module.embeddings, lora=module.lora, base={"architecture": "qwen2"})
    qwen.save(tmp_path / "qwen.safetensors")
    with pytest.raises(LookaheadModuleError, match="trained on a 'qwen2' model"):
        convert(tmp_path / "qwen.safetensors", model_path, tmp_path / "qwen.gguf")

    # not a module at all; the CLI says it in one line
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LookaheadModuleError, match="junk.safetensors is not a readable safetensors file"):
        load_module(tmp_path / "junk.safetensors")
    with pytest.raises(SystemExit) as exit_info:
        kvgguf.cli.main(["convert", "lookahead", str(tmp_path / "junk.safetensors"), "--base", model_path,
                         "-o", str(tmp_path / "junk.gguf")])
    assert exit_info.value.code == 2


def test_a_converted_module_for_another_model_is_refused(tmp_path, model_path, base):
    module = random_module(base, targets=("v_proj",), seed=4)
    module.save(tmp_path / "m.safetensors")
    converted = LookaheadFile.load(convert(tmp_path / "m.safetensors", model_path, tmp_path / "m.gguf"))
    other = BaseModel(path="other.gguf", architecture="llama", name="Other-1B", n_layer=base.n_layer,
                      n_embd=base.n_embd, n_vocab=base.n_vocab, n_head=base.n_head, n_head_kv=base.n_head_kv,
                      shapes={**base.shapes, "output.weight": (base.n_embd, base.n_vocab)})
    with pytest.raises(LookaheadModuleError, match="does not fit 'Other-1B' .*tensor shapes differs"):
        converted.check_model(other)


def test_llama_cpp_keeps_refusing_unknown_tensors_without_the_extra_prefix(tmp_path, model_path, base):
    """Patch 0015 lets only the tensors under adapter.extra_prefix through: a file without the key that carries
    another tensor is refused as before (and the refusal is a Python error, not an abort)."""
    gguf = gguf_module()
    module = random_module(base, targets=("v_proj",), seed=5)
    writer = gguf.GGUFWriter(str(tmp_path / "plain.gguf"), arch=base.architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, ALPHA)
    writer.add_tensor(EMBEDDING_TENSOR, module.embeddings)
    for (layer, _), (a, b) in module.lora.items():
        writer.add_tensor(f"blk.{layer}.attn_v.weight.lora_a", a)
        writer.add_tensor(f"blk.{layer}.attn_v.weight.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    llm = kvgguf.Llama(model_path, n_ctx=128, n_threads=2, verbose=False)
    try:
        with pytest.raises(ValueError, match="not a LoRA adapter for this model"):
            LoraAdapter(llm.model, tmp_path / "plain.gguf")
        module.save(tmp_path / "m.safetensors")
        LoraAdapter(llm.model, convert(tmp_path / "m.safetensors", model_path, tmp_path / "m.gguf")).close()
    finally:
        llm.close()


def test_cli_converts(tmp_path, model_path, base, capsys):
    random_module(base, targets=("o_proj",), seed=6).save(tmp_path / "m.safetensors")
    assert kvgguf.cli.main(["convert", "lookahead", str(tmp_path / "m.safetensors"), "--base", model_path,
                            "-o", str(tmp_path / "m.gguf")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m.gguf")
    assert LookaheadFile.load(tmp_path / "m.gguf").targets == ("o_proj",)
