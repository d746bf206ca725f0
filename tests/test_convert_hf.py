"""``kvgguf convert hf``: llama.cpp's own converter, from the pinned source, on tiny random Llama and Qwen2
checkpoints made here with transformers. The GGUF tokenizes as the checkpoint's SentencePiece model does, its logits
match transformers', and eviction runs on it: after SnapKV, the next token's logits are transformers' with the
evicted positions masked out of that token's attention. A checkpoint the converter cannot convert ends in its own
message, on one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kvgguf import Llama
from kvgguf.cli import main
from kvgguf.convert import hf
from kvgguf.text import haystack
from kvtest import last_logits
from readme_commands import readme_commands
from tiny_models import HF_ARCHITECTURES, write_tiny_hf_checkpoint

torch = pytest.importorskip("torch")
sentencepiece = pytest.importorskip("sentencepiece")

# Largest |logit difference| to transformers (float32) allowed, on logits whose std is ~0.8 and that move by up to
# ~4 from one position to the next. Measured max: 0.005 for f16 weights (llama.cpp's KV cache is f16 too), 0.11 for
# q8_0, over the 155 positions of the prompt below, both architectures.
F16_TOLERANCE = 0.02
Q8_0_TOLERANCE = 0.3
PROMPT = haystack(2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """Each architecture's checkpoint folder and its transformers model (float32, eager attention, which takes a
    custom 4-D mask as it is)."""
    root = tmp_path_factory.mktemp("hf")
    made = {}
    for architecture in HF_ARCHITECTURES:
        model = write_tiny_hf_checkpoint(root / architecture, architecture)
        model.config._attn_implementation = "eager"
        made[architecture] = (root / architecture, model)
    return made


@pytest.fixture(scope="module")
def f16_files(checkpoints, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {architecture: hf.convert_hf(folder, out / f"{architecture}-f16.gguf", "f16")
            for architecture, (folder, _) in checkpoints.items()}


def transformers_logits(model, tokens: list[int], last_row_keys: np.ndarray | None = None) -> np.ndarray:
    """Every position's logits from the transformers model; with ``last_row_keys``, the last token attends only to
    those positions (the others as the causal mask has them)."""
    n = len(tokens)
    mask = torch.triu(torch.full((n, n), float("-inf")), 1)
    if last_row_keys is not None:
        mask[-1] = float("-inf")
        mask[-1, torch.as_tensor(last_row_keys)] = 0.0
    with torch.no_grad():
        return model(torch.tensor([tokens]), attention_mask=mask[None, None]).logits[0].numpy()


def gguf_logits(path: Path) -> tuple[dict, list[int], np.ndarray]:
    """The GGUF's metadata, its tokens for PROMPT and the logits kvgguf's llama.cpp computes at each of them."""
    llm = Llama(str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    try:
        tokens = llm.tokenize(PROMPT.encode())
        llm.eval(tokens)
        return dict(llm.metadata), tokens, np.asarray(llm.scores[:len(tokens)])
    finally:
        llm.close()


@pytest.mark.parametrize("architecture", HF_ARCHITECTURES)
def test_converted_model_tokenizes_and_computes_as_transformers(architecture, checkpoints, f16_files):
    folder, model = checkpoints[architecture]
    metadata, tokens, ours = gguf_logits(f16_files[architecture])
    assert metadata["general.architecture"] == architecture
    spm = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert tokens == [spm.bos_id()] + spm.encode(PROMPT)
    theirs = transformers_logits(model, tokens)
    assert np.abs(ours - theirs).max() < F16_TOLERANCE
    assert np.abs(np.diff(theirs, axis=0)).max() > 1.0  # the logits do depend on the token and its position


@pytest.mark.parametrize("architecture", HF_ARCHITECTURES)
def test_eviction_on_a_converted_model_is_attention_over_the_kept_cells(architecture, checkpoints, f16_files):
    """SnapKV keeps 40% of the prompt's cells past its window; the token decoded next computes transformers'
    logits with the evicted positions masked, and measurably not the full cache's."""
    _, model = checkpoints[architecture]
    llm = Llama(str(f16_files[architecture]), n_ctx=512, n_threads=2, verbose=False, kv_eviction="snapkv",
                kv_keep=0.4, kv_granularity="token")
    try:
        tokens = llm.tokenize(PROMPT.encode())
        llm.create_completion(tokens, max_tokens=2, temperature=0)  # prefill, evict, decode the first token
        [eviction] = llm.kv_stats()["history"]
        target = llm.kv_settings.target_cells(len(tokens))
        kept = llm.kv_positions()
        decoded = tokens + [int(llm.input_ids[len(tokens)])]
        ours = last_logits(llm)
    finally:
        llm.close()
    assert eviction["cells_before"] == len(tokens) and eviction["cells_after"] == target < 0.7 * len(tokens)
    assert len(kept) == target + 1 and kept[-1] == len(tokens)  # the kept cells and the decoded token's
    masked = transformers_logits(model, decoded, last_row_keys=kept)[-1]
    full = transformers_logits(model, decoded)[-1]
    assert np.abs(ours - masked).max() < F16_TOLERANCE
    assert np.abs(ours - full).max() > 10 * F16_TOLERANCE


def test_readme_convert_command_writes_a_q8_0_gguf(checkpoints, tmp_path, capsys):
    [arguments] = readme_commands("convert hf")
    folder, model = checkpoints["llama"]
    out = tmp_path / Path(arguments[3]).name
    arguments[2:4] = [str(folder), str(out)]
    assert main(arguments) == 0
    assert capsys.readouterr().out.startswith(f"{out}: llama ")
    _, tokens, ours = gguf_logits(out)
    theirs = transformers_logits(model, tokens)
    assert np.abs(ours - theirs).max() < Q8_0_TOLERANCE
    assert (ours.argmax(axis=1) == theirs.argmax(axis=1)).mean() > 0.9  # measured 0.95


def test_an_architecture_the_converter_does_not_know_is_its_message_on_one_line(checkpoints, tmp_path, capsys):
    folder = tmp_path / "unknown"
    shutil.copytree(checkpoints["llama"][0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "hf", str(folder), str(tmp_path / "out.gguf")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith("kvgguf convert: error: ") and "Model NoSuchModelForCausalLM is not supported" in error
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("arguments,message", [
    (["/nonexistent/checkpoint", "out.gguf"], "/nonexistent/checkpoint: no such checkpoint folder"),
    (["{empty}", "out.gguf"], "not a Hugging Face checkpoint (it has no config.json)"),
    (["{llama}", "/nonexistent/dir/out.gguf"], "/nonexistent/dir: no such folder to write out.gguf into"),
])
def test_bad_arguments_are_named_on_one_line(arguments, message, checkpoints, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    arguments = [a.format(empty=tmp_path / "empty", llama=checkpoints["llama"][0]) for a in arguments]
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "hf", *arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error


def test_an_outtype_the_converter_lacks_is_refused_by_the_parser(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "hf", str(tmp_path), "out.gguf", "--outtype", "q4_0"])
    assert exit_info.value.code == 2 and "invalid choice: 'q4_0'" in capsys.readouterr().err
