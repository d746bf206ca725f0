"""Trained LookaheadKV modules into the GGUF that llama.cpp and kvgguf load: ``kvgguf convert lookahead``.

The input is a module in the base model's Hugging Face layout (``lookahead.safetensors`` from ``kvgguf
train-lookahead``, or a PEFT LoRA folder with an embeddings file; ``kvgguf.lookahead.load_module``). The output is
a LoRA adapter GGUF in the layout of llama.cpp's own convert_lora_to_gguf.py, plus the lookahead embeddings and
the module's metadata, which llama.cpp leaves to kvgguf (``adapter.extra_prefix``, patch 0015); the layout is in
``kvgguf/lookahead.py``.

Every LoRA pair is checked against the base model's GGUF: the tensor it adapts must exist and have the shapes
that A [rank, in] and B [out, rank] imply. For the ``llama`` architecture, llama.cpp's converter reorders the
rows of q and k for its RoPE layout (and transformers orders them back when it loads the GGUF, which is the
layout the module was trained in): the rows of B for q and k are reordered the same way here, A is unchanged.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kvgguf.contexts import file_fingerprint
from kvgguf.gguf_py import gguf_module
from kvgguf.lookahead import (EMBEDDING_TENSOR, EXTRA_PREFIX, FORMAT_VERSION, GGUF_PREFIX, TARGETS, BaseModel,
                              LookaheadModule, LookaheadModuleError, load_module)

logger = logging.getLogger(__name__)

ADAPTER_EXTRA_PREFIX_KEY = "adapter.extra_prefix"
# architectures whose q and k rows llama.cpp's converter permutes for RoPE (LlamaModel.permute)
PERMUTED_ARCHITECTURES = ("llama",)
OUTTYPES = {"f32": np.float32, "f16": np.float16}


def rope_permute(rows: npt.NDArray[np.float32], n_head: int) -> npt.NDArray[np.float32]:
    """The rows of a q or k projection (``n_head`` heads of them, HF order) in llama.cpp's order: within each
    head, HF keeps the two halves of the rotated pairs apart, llama.cpp interleaves them."""
    n_rows = rows.shape[0]
    if n_rows % (2 * n_head):
        raise LookaheadModuleError(f"{n_rows} rows can not be {n_head} heads of rotated pairs")
    return rows.reshape(n_head, 2, n_rows // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_tensors(module: LookaheadModule, base: BaseModel) -> dict[str, npt.NDArray[np.float32]]:
    """The module's LoRA pairs under llama.cpp's names (``blk.{i}.attn_q.weight.lora_a``, ...), in its row order,
    each checked against the base model's tensor."""
    if module.n_layer > base.n_layer:
        raise LookaheadModuleError(f"the module adapts layer {module.n_layer - 1}, the base model {base.path} has "
                                   f"{base.n_layer} layers")
    if module.embeddings.shape[1] != base.n_embd:
        raise LookaheadModuleError(f"the lookahead embeddings have {module.embeddings.shape[1]} values per row, the "
                                   f"base model {base.path} has n_embd = {base.n_embd}")
    tensors = {}
    for (layer, target), (a, b) in sorted(module.lora.items()):
        name = f"blk.{layer}.{TARGETS[target]}.weight"
        shape = base.shapes.get(name)
        if shape is None:
            raise LookaheadModuleError(f"layers.{layer}.{target}: the base model {base.path} has no tensor {name}")
        expected = (shape[1], shape[0])  # [out, in] in numpy order
        if (b.shape[0], a.shape[1]) != expected:
            raise LookaheadModuleError(f"layers.{layer}.{target}: lora_b {list(b.shape)} @ lora_a {list(a.shape)} is "
                                       f"{[b.shape[0], a.shape[1]]}, the base model's {name} is {list(expected)}")
        if base.architecture in PERMUTED_ARCHITECTURES and target in ("q_proj", "k_proj"):
            b = rope_permute(b, base.n_head if target == "q_proj" else base.n_head_kv)
        tensors[f"{name}.lora_a"] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[f"{name}.lora_b"] = np.ascontiguousarray(b, dtype=np.float32)
    return tensors


def convert(module_path: str | os.PathLike[str], base_path: str | os.PathLike[str],
            out_path: str | os.PathLike[str], embeddings: str | os.PathLike[str] | None = None,
            outtype: str = "f32") -> Path:
    """Convert the module at ``module_path`` for the base model GGUF at ``base_path`` into ``out_path``, its
    tensors in ``outtype`` ("f32", or "f16": half the size, as llama.cpp's own LoRA converter offers)."""
    if outtype not in OUTTYPES:
        raise LookaheadModuleError(f"outtype must be one of {sorted(OUTTYPES)}, got {outtype!r}")
    dtype = OUTTYPES[outtype]
    gguf = gguf_module()
    module = load_module(module_path, embeddings)
    base = BaseModel.read(base_path)
    made_for = module.base.get("architecture")
    if made_for and made_for != base.architecture:
        raise LookaheadModuleError(f"the module was trained on a {made_for!r} model ({module.base.get('name')!r}), "
                                   f"the base model {base.path} is {base.architecture!r}")
    lora = gguf_tensors(module, base)
    fingerprint = file_fingerprint(base_path)
    if module.base.get("fingerprint") not in (None, fingerprint):
        logger.warning("the module was trained on another file of this model (%s); converting for %s",
                       module.base.get("name") or module.base.get("fingerprint"), base.path)

    out_path = Path(out_path)
    writer = gguf.GGUFWriter(str(out_path), arch=base.architecture)
    writer.add_name(f"{base.name or base.architecture} lookahead module")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(module.lora_alpha))
    writer.add_string(ADAPTER_EXTRA_PREFIX_KEY, EXTRA_PREFIX)
    writer.add_uint32(GGUF_PREFIX + "version", FORMAT_VERSION)
    writer.add_uint32(GGUF_PREFIX + "n_tokens", module.n_lookahead)
    writer.add_uint32(GGUF_PREFIX + "pool_kernel", module.pool_kernel)
    writer.add_uint32(GGUF_PREFIX + "rank", module.rank)
    writer.add_array(GGUF_PREFIX + "targets", module.targets)
    writer.add_string(GGUF_PREFIX + "base.architecture", base.architecture)
    writer.add_string(GGUF_PREFIX + "base.name", base.name)
    writer.add_string(GGUF_PREFIX + "base.fingerprint", fingerprint)
    writer.add_uint32(GGUF_PREFIX + "base.n_layer", base.n_layer)
    writer.add_uint32(GGUF_PREFIX + "base.n_embd", base.n_embd)
    writer.add_uint32(GGUF_PREFIX + "base.n_vocab", base.n_vocab)
    writer.add_string(GGUF_PREFIX + "base.shapes", base.shapes_digest())
    writer.add_tensor(EMBEDDING_TENSOR, np.ascontiguousarray(module.embeddings, dtype=dtype))
    for name, tensor in lora.items():
        writer.add_tensor(name, tensor.astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    logger.info("wrote %s: %d lookahead embeddings, LoRA rank %d on %d tensors", out_path, module.n_lookahead,
                module.rank, len(lora) // 2)
    return out_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("module", help="lookahead.safetensors (kvgguf train-lookahead), or a PEFT LoRA folder")
    parser.add_argument("--base", required=True, help="the base model's GGUF file")
    parser.add_argument("-o", "--output", required=True, help="the lookahead module GGUF to write")
    parser.add_argument("--outtype", choices=sorted(OUTTYPES), default="f32",
                        help="tensor type of the output (f16: half the size)")
    parser.add_argument("--embeddings", help="with a PEFT folder: the safetensors file of the lookahead embeddings "
                                             "(default: the folder's only other *.safetensors file)")


def main(args: argparse.Namespace) -> int:
    print(convert(args.module, args.base, args.output, args.embeddings, args.outtype))
    return 0
