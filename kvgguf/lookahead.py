"""LookaheadKV modules (arXiv 2603.10899): learned lookahead embeddings plus LoRA weights, in the two files they
live in.

A module is ``n_lookahead`` (32) input embeddings, decoded after a prompt as one embedding batch, and a LoRA (rank
8, alpha 32) on the q, k, v, o, gate, up and down projections of every layer, switched on for that decode only; the
attention those rows pay to the prompt scores its cells (../shared/METHODS.md, LookaheadKV).

**The trained module** (``lookahead.safetensors``, what ``kvgguf train-lookahead`` writes; read with
``load_module``), in the base model's Hugging Face layout (rows of q and k in HF order, as transformers loads a
GGUF):

- ``embeddings``: float32 [n_lookahead, n_embd]
- ``layers.{i}.{target}.lora_a``: float32 [rank, in_features]; ``layers.{i}.{target}.lora_b``: float32
  [out_features, rank], for ``target`` in ``TARGETS`` (the update is ``alpha / rank * B @ A``)
- metadata (the safetensors header's string map): ``format`` = ``kvgguf.lookahead``, ``version``, ``lora_alpha``,
  ``pool_kernel``, and the base model's ``base.architecture``, ``base.name``, ``base.fingerprint``

``load_module`` also reads a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.model.layers.{i}.{self_attn|mlp}.{target}.lora_{A|B}.weight``) with the embeddings in a
safetensors file of one tensor beside it, as kvpress's RestoreKV press stores its modules.

**The converted module** (``lookahead.gguf``, ``kvgguf convert lookahead``, ``convert/lookahead.py``): a LoRA
adapter GGUF that llama.cpp loads (``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``,
``blk.{i}.{attn_q|...}.weight.lora_a/.lora_b`` in llama.cpp's own row order), and, left to kvgguf by the adapter's
``adapter.extra_prefix`` (patch 0015), the tensor ``lookahead.embd`` and the ``kvgguf.lookahead.*`` metadata:
``version``, ``n_tokens``, ``pool_kernel``, ``rank``, ``targets``, and the base model's ``base.architecture``,
``base.name``, ``base.fingerprint``, ``base.n_layer``, ``base.n_embd``, ``base.n_vocab``, ``base.shapes`` (the
SHA-256 of its tensors' names and shapes). Read with ``LookaheadFile.load``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .gguf_py import gguf_module

logger = logging.getLogger(__name__)

FORMAT = "kvgguf.lookahead"
FORMAT_VERSION = 1
# the projections that carry LoRA, by their Hugging Face names, and the llama.cpp tensors they are
TARGETS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
           "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
N_LOOKAHEAD = 32
LORA_RANK = 8
LORA_ALPHA = 32.0
POOL_KERNEL = 7
GGUF_PREFIX = "kvgguf.lookahead."
EXTRA_PREFIX = "lookahead."       # adapter.extra_prefix: the tensors llama.cpp leaves to kvgguf
EMBEDDING_TENSOR = "lookahead.embd"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


class LookaheadModuleError(ValueError):
    """A lookahead module that can not be used: unreadable, inconsistent, or made for another model."""


@dataclass
class LookaheadModule:
    """Lookahead embeddings and LoRA weights, in the base model's Hugging Face layout."""

    embeddings: npt.NDArray[np.float32]                  # [n_lookahead, n_embd]
    lora: dict[tuple[int, str], tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]  # (layer, target) -> A, B
    lora_alpha: float = LORA_ALPHA
    pool_kernel: int = POOL_KERNEL
    base: dict[str, str] = field(default_factory=dict)   # architecture, name, fingerprint of the base model

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] == 0:
            raise LookaheadModuleError(f"lookahead embeddings must be [n_lookahead, n_embd], got "
                                       f"{list(self.embeddings.shape)}")
        if not self.lora:
            raise LookaheadModuleError("the lookahead module has no LoRA weights")
        ranks = set()
        for (layer, target), (a, b) in self.lora.items():
            if target not in TARGETS:
                raise LookaheadModuleError(f"LoRA target {target!r} of layer {layer} is not one of {sorted(TARGETS)}")
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise LookaheadModuleError(f"layers.{layer}.{target}: lora_a {list(a.shape)} and lora_b "
                                           f"{list(b.shape)} are not [rank, in] and [out, rank]")
            ranks.add(a.shape[0])
        if len(ranks) != 1:
            raise LookaheadModuleError(f"the LoRA weights have different ranks: {sorted(ranks)}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise LookaheadModuleError(f"pool_kernel must be odd and >= 1, got {self.pool_kernel}")

    @property
    def n_lookahead(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def rank(self) -> int:
        return int(next(iter(self.lora.values()))[0].shape[0])

    @property
    def n_layer(self) -> int:
        return 1 + max(layer for layer, _ in self.lora)

    @property
    def targets(self) -> list[str]:
        present = {target for _, target in self.lora}
        return [target for target in TARGETS if target in present]

    def tensors(self) -> dict[str, npt.NDArray[np.float32]]:
        """The module's tensors under their ``lookahead.safetensors`` keys."""
        tensors = {"embeddings": np.ascontiguousarray(self.embeddings, dtype=np.float32)}
        for (layer, target), (a, b) in sorted(self.lora.items()):
            tensors[f"layers.{layer}.{target}.lora_a"] = np.ascontiguousarray(a, dtype=np.float32)
            tensors[f"layers.{layer}.{target}.lora_b"] = np.ascontiguousarray(b, dtype=np.float32)
        return tensors

    def metadata(self) -> dict[str, str]:
        meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "lora_alpha": repr(float(self.lora_alpha)),
                "pool_kernel": str(self.pool_kernel)}
        meta.update({f"base.{key}": str(value) for key, value in self.base.items()})
        return meta

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``lookahead.safetensors`` (the layout in the module docstring)."""
        from safetensors.numpy import save_file

        path = Path(path)
        save_file(self.tensors(), str(path), metadata=self.metadata())
        return path


def load_module(path: str | os.PathLike[str], embeddings: str | os.PathLike[str] | None = None) -> LookaheadModule:
    """A lookahead module from ``lookahead.safetensors``, or from a PEFT LoRA folder with its embeddings in
    ``embeddings`` (a safetensors file of one [n_lookahead, n_embd] tensor; default: the only other
    ``*.safetensors`` file in the folder). LookaheadModuleError naming what is wrong."""
    path = Path(path)
    if path.is_dir():
        return _load_peft(path, embeddings)
    if not path.is_file():
        raise LookaheadModuleError(f"lookahead module {str(path)!r} is neither a file nor a PEFT folder")
    tensors, meta = _read_safetensors(path)
    if meta.get("format") != FORMAT:
        raise LookaheadModuleError(f"{path} is not a kvgguf lookahead module (metadata format="
                                   f"{meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("version") != str(FORMAT_VERSION):
        raise LookaheadModuleError(f"{path} is a lookahead module of format version {meta.get('version')!r}; this "
                                   f"kvgguf reads version {FORMAT_VERSION}")
    if "embeddings" not in tensors:
        raise LookaheadModuleError(f"{path} has no 'embeddings' tensor")
    pairs: dict[tuple[int, str], dict[str, npt.NDArray[np.float32]]] = {}
    for key, value in tensors.items():
        if key == "embeddings":
            continue
        parts = key.split(".")
        if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit() or parts[3] not in ("lora_a", "lora_b"):
            raise LookaheadModuleError(f"{path}: unexpected tensor {key!r} (expected layers.<i>.<target>.lora_a/b)")
        pairs.setdefault((int(parts[1]), parts[2]), {})[parts[3]] = value
    base = {key[len("base."):]: value for key, value in meta.items() if key.startswith("base.")}
    return LookaheadModule(embeddings=tensors["embeddings"], lora=_paired(pairs, path),
                           lora_alpha=float(meta.get("lora_alpha", LORA_ALPHA)),
                           pool_kernel=int(meta.get("pool_kernel", POOL_KERNEL)), base=base)


def _read_safetensors(path: Path) -> tuple[dict[str, npt.NDArray[np.float32]], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = dict(handle.metadata() or {})
            tensors = {key: np.asarray(handle.get_tensor(key), dtype=np.float32) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for a file that is not one
        raise LookaheadModuleError(f"{path} is not a readable safetensors file: {error}") from error
    return tensors, meta


def _paired(pairs: dict[tuple[int, str], dict[str, npt.NDArray[np.float32]]],
            path: Path) -> dict[tuple[int, str], tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]:
    lora = {}
    for (layer, target), ab in sorted(pairs.items()):
        missing = [name for name in ("lora_a", "lora_b") if name not in ab]
        if missing:
            raise LookaheadModuleError(f"{path}: layers.{layer}.{target} has no {missing[0]}")
        lora[(layer, target)] = (ab["lora_a"], ab["lora_b"])
    return lora


def _load_peft(folder: Path, embeddings: str | os.PathLike[str] | None) -> LookaheadModule:
    config_path, weights_path = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise LookaheadModuleError(f"PEFT folder {str(folder)!r} has no {needed.name}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise LookaheadModuleError(f"{config_path} is not JSON: {error}") from error
    if config.get("use_rslora") or config.get("use_dora"):
        raise LookaheadModuleError(f"{config_path}: rsLoRA and DoRA adapters are not supported")
    if embeddings is None:
        others = sorted(p for p in folder.glob("*.safetensors") if p.name != PEFT_WEIGHTS)
        if len(others) != 1:
            raise LookaheadModuleError(f"PEFT folder {str(folder)!r} needs the lookahead embeddings in one other "
                                       f"*.safetensors file, found {[p.name for p in others]}")
        embeddings = others[0]
    embedding_tensors, _ = _read_safetensors(Path(embeddings))
    if len(embedding_tensors) != 1:
        raise LookaheadModuleError(f"{embeddings} must hold one tensor (the lookahead embeddings), holds "
                                   f"{sorted(embedding_tensors)}")
    tensors, _ = _read_safetensors(weights_path)
    pairs: dict[tuple[int, str], dict[str, npt.NDArray[np.float32]]] = {}
    for key, value in tensors.items():
        parts = key.split(".")
        # base_model.model.model.layers.<i>.<self_attn|mlp>.<target>.lora_<A|B>.weight
        try:
            at = parts.index("layers")
            layer, target, which = int(parts[at + 1]), parts[at + 3], parts[at + 4]
        except (ValueError, IndexError):
            raise LookaheadModuleError(f"{weights_path}: unexpected tensor {key!r}") from None
        if which not in ("lora_A", "lora_B") or parts[-1] != "weight":
            raise LookaheadModuleError(f"{weights_path}: unexpected tensor {key!r}")
        pairs.setdefault((layer, target), {})["lora_a" if which == "lora_A" else "lora_b"] = value
    return LookaheadModule(embeddings=next(iter(embedding_tensors.values())), lora=_paired(pairs, weights_path),
                           lora_alpha=float(config.get("lora_alpha", LORA_ALPHA)))


# --- the base model ---------------------------------------------------------------------------------------------

def shapes_digest(names_and_shapes: list[tuple[str, tuple[int, ...]]]) -> str:
    """SHA-256 of a model's tensor names and shapes: the same for every quantization of one model."""
    digest = hashlib.sha256()
    for name, shape in sorted(names_and_shapes):
        digest.update(f"{name}:{','.join(str(n) for n in shape)};".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class BaseModel:
    """What a lookahead module is checked against: a model GGUF's architecture, sizes and tensor shapes."""

    path: str
    architecture: str
    name: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: int
    n_head_kv: int
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape (ggml order: ne[0] first)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> BaseModel:
        gguf = gguf_module()
        try:
            reader = gguf.GGUFReader(str(path))
        except (OSError, ValueError) as error:
            raise LookaheadModuleError(f"{path} is not a readable GGUF model: {error}") from error

        def field_value(key: str, default: object = None) -> object:
            reader_field = reader.get_field(key)
            return reader_field.contents() if reader_field is not None else default

        architecture = str(field_value("general.architecture", ""))
        if field_value("general.type", "model") != "model":
            raise LookaheadModuleError(f"{path} is not a model GGUF (general.type={field_value('general.type')!r})")
        shapes = {tensor.name: tuple(int(n) for n in tensor.shape) for tensor in reader.tensors}
        if "token_embd.weight" not in shapes:
            raise LookaheadModuleError(f"{path} has no token_embd.weight tensor")
        n_head = int(field_value(f"{architecture}.attention.head_count", 0) or 0)
        return cls(path=str(path), architecture=architecture, name=str(field_value("general.name", "") or ""),
                   n_layer=int(field_value(f"{architecture}.block_count", 0) or 0),
                   n_embd=shapes["token_embd.weight"][0], n_vocab=shapes["token_embd.weight"][1], n_head=n_head,
                   n_head_kv=int(field_value(f"{architecture}.attention.head_count_kv", n_head) or n_head),
                   shapes=shapes)

    def shapes_digest(self) -> str:
        return shapes_digest(list(self.shapes.items()))


# --- the converted file -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LookaheadFile:
    """A converted lookahead module (``lookahead.gguf``): the LoRA adapter llama.cpp loads from ``path``, and the
    embeddings and metadata kvgguf reads from it."""

    path: str
    embeddings: npt.NDArray[np.float32]  # [n_lookahead, n_embd]
    pool_kernel: int
    rank: int
    targets: tuple[str, ...]
    base: dict[str, object]

    @property
    def n_lookahead(self) -> int:
        return int(self.embeddings.shape[0])

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LookaheadFile:
        gguf = gguf_module()
        if not os.path.isfile(path):
            raise LookaheadModuleError(f"lookahead module {str(path)!r} is not a file")
        try:
            reader = gguf.GGUFReader(str(path))
        except (OSError, ValueError) as error:
            raise LookaheadModuleError(f"{path} is not a readable GGUF file: {error}") from error
        values = {name[len(GGUF_PREFIX):]: reader_field.contents() for name, reader_field in reader.fields.items()
                  if name.startswith(GGUF_PREFIX)}
        if not values:
            raise LookaheadModuleError(f"{path} is not a converted lookahead module (no {GGUF_PREFIX}* metadata; "
                                       f"convert one with `kvgguf convert lookahead`)")
        if values.get("version") != FORMAT_VERSION:
            raise LookaheadModuleError(f"{path} is a lookahead module of format version {values.get('version')!r}; "
                                       f"this kvgguf reads version {FORMAT_VERSION}")
        tensor = next((t for t in reader.tensors if t.name == EMBEDDING_TENSOR), None)
        if tensor is None:
            raise LookaheadModuleError(f"{path} has no {EMBEDDING_TENSOR} tensor")
        embeddings = np.array(tensor.data, dtype=np.float32).reshape(int(tensor.shape[1]), int(tensor.shape[0]))
        try:
            base = {key[len("base."):]: value for key, value in values.items() if key.startswith("base.")}
            result = cls(path=str(path), embeddings=embeddings, pool_kernel=int(values["pool_kernel"]),
                         rank=int(values["rank"]), targets=tuple(values["targets"]), base=base)
        except KeyError as missing:
            raise LookaheadModuleError(f"{path}: the lookahead module lacks {GGUF_PREFIX}{missing.args[0]}") from None
        if result.n_lookahead != int(values.get("n_tokens", -1)):
            raise LookaheadModuleError(f"{path}: {GGUF_PREFIX}n_tokens={values.get('n_tokens')!r} but "
                                       f"{EMBEDDING_TENSOR} has {result.n_lookahead} rows")
        return result

    def check_model(self, model: BaseModel) -> None:
        """LookaheadModuleError naming both models when this module was made for another one (a different
        architecture, size or tensor shapes); another file of the same shapes (another quantization) is logged."""
        base = self.base
        for what, ours, theirs in (("architecture", base.get("architecture"), model.architecture),
                                   ("n_layer", base.get("n_layer"), model.n_layer),
                                   ("n_embd", base.get("n_embd"), model.n_embd),
                                   ("n_vocab", base.get("n_vocab"), model.n_vocab),
                                   ("tensor shapes", base.get("shapes"), model.shapes_digest())):
            if ours != theirs:
                raise LookaheadModuleError(
                    f"the lookahead module {self.path} was made for {base.get('name') or base.get('architecture')!r} "
                    f"and does not fit {model.name or model.architecture!r} ({model.path}): {what} differs "
                    f"({ours!r} vs {theirs!r})")
        if self.embeddings.shape[1] != model.n_embd:
            raise LookaheadModuleError(f"{self.path}: {EMBEDDING_TENSOR} rows have {self.embeddings.shape[1]} values, "
                                       f"the model's embeddings {model.n_embd}")


# --- at run time ------------------------------------------------------------------------------------------------

# modules that ship with the package (made by `kvgguf train-lookahead` + `kvgguf convert lookahead`; docs/lookahead/)
SHIPPED_DIR = Path(__file__).with_name("lookahead_modules")


@dataclass
class LookaheadRuntime:
    """A converted module loaded for one model: its embeddings and metadata, and its LoRA in llama.cpp."""

    file: LookaheadFile
    adapter: Any  # kvgguf.scoring.LoraAdapter

    def close(self) -> None:
        self.adapter.close()


def shipped_module(model_path: str | os.PathLike[str]) -> Path | None:
    """The module shipped with the package for the GGUF file at ``model_path`` (matched by the file's
    fingerprint), or None."""
    from .contexts import file_fingerprint

    if not SHIPPED_DIR.is_dir():
        return None
    fingerprint = file_fingerprint(model_path)
    gguf = gguf_module()
    for candidate in sorted(SHIPPED_DIR.glob("*.gguf")):
        field_ = gguf.GGUFReader(str(candidate)).get_field(GGUF_PREFIX + "base.fingerprint")
        if field_ is not None and field_.contents() == fingerprint:
            return candidate
    return None


def resolve_lookahead(spec: str | os.PathLike[str] | None, model_path: str | os.PathLike[str],
                      model: Any) -> LookaheadRuntime | None:
    """The lookahead module a ``Llama`` scores with: a converted module's path (checked against the model and
    loaded into llama.cpp), or None: the one shipped for this model file, if any."""
    from .scoring import LoraAdapter

    if spec is None:
        spec = shipped_module(model_path)
        if spec is None:
            return None
    elif not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"kv_lookahead must be the path of a converted lookahead module or None, got {spec!r}")
    module = LookaheadFile.load(spec)
    module.check_model(BaseModel.read(model_path))
    try:
        adapter = LoraAdapter(model, spec)
    except ValueError as error:
        raise LookaheadModuleError(f"kv_lookahead={str(spec)!r}: {error}") from None
    return LookaheadRuntime(file=module, adapter=adapter)
