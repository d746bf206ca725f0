"""kvgguf's converters, installed as ``kvgguf.convert``: the modules that turn other formats into GGUF files for
llama.cpp, written with gguf-py (HF checkpoints through llama.cpp's own convert_hf_to_gguf.py from the pinned
source, trained lookahead modules into LoRA-adapter GGUFs, per-model head profiles into GGUF metadata).

- ``hf``: Hugging Face checkpoints into GGUF with llama.cpp's own converter (``kvgguf convert hf``);
- ``lookahead``: trained LookaheadKV modules into a LoRA-adapter GGUF (``kvgguf convert lookahead``)."""
