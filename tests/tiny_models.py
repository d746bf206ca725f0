"""Tiny random-weight GGUF models written with gguf-py, for tests that need an architecture the other test models lack.

``write_tiny_alibi_model`` writes an MPT model with ALiBi attention (no RoPE, no position embeddings), so tests can
check what kvgguf allows on a model whose attention bias depends on the distance between query and key positions.
"""

from __future__ import annotations

import numpy as np

N_LAYER = 2
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 4
N_FF = 128
N_CTX_TRAIN = 512
MAX_ALIBI_BIAS = 8.0
WEIGHT_SCALE = 0.02

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SPACE = "\u2581"  # SentencePiece's word-boundary mark, which stands for " "


def _spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """An SPM vocab: <unk>, <s>, </s>, the 256 byte-fallback tokens, then one token per printable ASCII character
    (with the space written as the SentencePiece mark). Returns the tokens, their scores and their token types."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    tokens += [SPACE] + [chr(code) for code in range(0x21, 0x7F)]
    types += [gguf.TokenType.NORMAL] * (len(tokens) - len(types))
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(tokens) - 3 - 256)]
    return tokens, scores, [int(t) for t in types]


def write_tiny_alibi_model(path, seed: int = 0) -> str:
    """Write a tiny random-weight MPT model that llama.cpp runs with ALiBi to ``path``; return the path as a string.

    The model is for tests of what kvgguf allows on models that use ALiBi: ``mpt.attention.max_alibi_bias`` is 8.0,
    so llama.cpp sets ``hparams.use_alibi`` and biases attention by key distance instead of rotating K. It has
    2 layers, n_embd 64, 4 heads (4 KV heads), feed-forward 128, context length 512, f32 weights drawn from
    ``numpy.random.default_rng(seed)`` (small, so logits are finite), layer norms with weight 1 and no bias, and an
    output projection tied to the token embeddings. Its SPM vocab (byte fallback) tokenizes any text.
    """
    import gguf

    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * WEIGHT_SCALE).astype(np.float32)

    def ones() -> np.ndarray:
        return np.ones(N_EMBD, dtype=np.float32)

    tokens, scores, types = _spm_vocab()
    n_embd_gqa = N_EMBD // N_HEAD * N_HEAD_KV

    writer = gguf.GGUFWriter(str(path), arch="mpt")
    writer.add_name("tiny-alibi-mpt")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_layer_norm_eps(1e-5)
    writer.add_max_alibi_bias(MAX_ALIBI_BIAS)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    # gguf-py takes numpy shapes (rows, columns); llama.cpp reads them reversed as {ne0, ne1}.
    writer.add_tensor("token_embd.weight", weight(len(tokens), N_EMBD))
    writer.add_tensor("output_norm.weight", ones())
    for layer in range(N_LAYER):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", ones())
        writer.add_tensor(f"{prefix}.attn_qkv.weight", weight(N_EMBD + 2 * n_embd_gqa, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_output.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", ones())
        writer.add_tensor(f"{prefix}.ffn_up.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weight(N_EMBD, N_FF))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


# Tiny Hugging Face checkpoints, for the HF -> GGUF converter's tests (kvgguf convert hf)
HF_ARCHITECTURES = ("llama", "qwen2")
HF_VOCAB_SIZE = 600
HF_INIT_STD = 0.1  # larger than a trained model's 0.02: attention that depends on the tokens and their positions


def _train_sentencepiece(folder) -> int:
    """Train a SentencePiece BPE tokenizer (as Llama's; byte fallback: it tokenizes any text) on the standard library's
    documentation prose and write it to ``folder/tokenizer.model``; return its vocab size."""
    import io

    import sentencepiece

    from kvgguf.prose import paragraphs

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(paragraphs(("argparse", "logging", "json"))), model_writer=model,
        vocab_size=HF_VOCAB_SIZE, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1, num_threads=1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue()).vocab_size()


# Models whose memory is not one attention KV cache, which eviction refuses: a recurrent one (Mamba: a fixed-size
# state per sequence) and a hybrid one (Jamba: Mamba layers plus attention layers, llama_memory_hybrid). Tiny configs
# that llama.cpp's converter and loader accept (sizes multiples of what the kernels tile by).
MEMORY_ARCHITECTURES = {
    "mamba": lambda transformers, vocab_size: transformers.MambaConfig(
        vocab_size=vocab_size, hidden_size=N_EMBD, state_size=16, num_hidden_layers=N_LAYER, expand=2, conv_kernel=4,
        time_step_rank=4, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, pad_token_id=UNK_ID, tie_word_embeddings=False),
    "jamba": lambda transformers, vocab_size: transformers.JambaConfig(
        vocab_size=vocab_size, hidden_size=N_EMBD, intermediate_size=N_FF, num_hidden_layers=N_LAYER,
        num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD // 2, num_experts=1, num_experts_per_tok=1,
        expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=16,
        mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False, rms_norm_eps=1e-5,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=UNK_ID, tie_word_embeddings=False),
}


def write_tiny_hf_checkpoint(folder, architecture: str, seed: int = 0):
    """Write a tiny random-weight Hugging Face checkpoint of ``architecture`` ("llama" or "qwen2") to ``folder``
    with transformers (config.json, model.safetensors, a SentencePiece tokenizer.model); return the model in
    float32, in eval mode.

    2 layers, hidden 64, 4 query heads sharing 2 KV heads (grouped-query attention), feed-forward 128, RoPE,
    weights drawn with ``torch.manual_seed(seed)`` at std 0.1; Qwen2 adds its q/k/v biases, drawn the same way.
    """
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = _train_sentencepiece(folder)
    if architecture in MEMORY_ARCHITECTURES:
        config = MEMORY_ARCHITECTURES[architecture](transformers, vocab_size)
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(folder, safe_serialization=True)
        return model.eval()
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[architecture]
    config = config_class(vocab_size=vocab_size, hidden_size=N_EMBD, intermediate_size=N_FF,
                          num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD // 2,
                          max_position_embeddings=N_CTX_TRAIN, rms_norm_eps=1e-5, rope_theta=10000.0,
                          initializer_range=HF_INIT_STD, tie_word_embeddings=False, bos_token_id=BOS_ID,
                          eos_token_id=EOS_ID, dtype="float32")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # biases start at zero; draw them so the converter's handling of them is tested
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, HF_INIT_STD)
    model.save_pretrained(folder, safe_serialization=True)
    return model.eval()
