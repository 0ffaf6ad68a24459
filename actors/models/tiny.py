"""A tiny Llama model directory made locally, with no download: for tests, CI and CPU benchmarks.

``make_tiny_model(path)`` writes a byte-level BPE tokenizer (trained with ``tokenizers`` on generated
text: deterministic, a second or two) and a small ``LlamaForCausalLM`` config. There are no weights:
load it with ``load_format="dummy"`` (vLLM fills the weights at random), so it produces the same
*work* as a real model of its shape, not sensible text. Workloads ask for exact output lengths
(``ignore_eos``), which is what makes that enough.

    python -m nalar.actors.models.tiny /tmp/tiny-llama      # prints the path
    nalar node mymodels:Writer   # with engine = "vllm:/tmp/tiny-llama", engine_args={"load_format": "dummy"}
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path

#: Bumped whenever what is written changes, so an old directory is remade rather than reused.
VERSION = 4
VOCAB_SIZE = 1024
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TEMPLATE = (  # Llama-style: the template starts with BOS (vLLM's chat path adds no special tokens)
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORDS = (
    "the of and to in is was for on that with as by at from it be this are or an have not which one "
    "agent tool model call future actor node session state policy token cache prefix batch queue "
    "request answer question search summary plan step result error time memory vector graph engine "
    "quick brown fox jumps over lazy dog alpha beta gamma delta zero two three four five six seven "
    "eight nine ten hundred thousand data value key list map set string number true false none"
).split()


def _corpus(lines: int = 4000, seed: int = 0) -> list[str]:
    """Generated text: words, digits, punctuation and code-like lines (a fixed seed: deterministic)."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        n = rng.randint(4, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if i % 5 == 0:
            words.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
        s = " ".join(words)
        if i % 7 == 0:
            s = s.capitalize() + rng.choice([".", "?", "!", ":", ";"])
        if i % 11 == 0:
            s = f"def {words[0]}_{words[1]}(x, y={i}):\n    return {{'{words[2]}': [x, y]}}"
        out.append(s)
    return out


def _train_tokenizer() -> "object":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return tok


def _config(vocab: int, bos_id: int, eos_id: int) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 32,  # vLLM's CPU attention supports head sizes from 32 up
        "hidden_act": "silu",
        "max_position_embeddings": 16384,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "torch_dtype": "float32",
        "use_cache": True,
        "nalar_tiny_version": VERSION,
    }


def make_tiny_model(path: str | os.PathLike[str]) -> str:
    """Make the tiny model directory at ``path`` (skipped if it is already there); return its path."""
    root = Path(path).expanduser().resolve()
    marker = root / "nalar-tiny.json"
    try:
        if json.loads(marker.read_text()).get("version") == VERSION:
            return str(root)
    except (OSError, ValueError, AttributeError):
        pass
    root.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    vocab = tok.get_vocab_size()  # type: ignore[attr-defined]
    bos_id, eos_id, pad_id = (tok.token_to_id(t) for t in (BOS, EOS, PAD))  # type: ignore[attr-defined]
    files: dict[str, str] = {
        "config.json": json.dumps(_config(vocab, bos_id, eos_id), indent=2),
        "generation_config.json": json.dumps({"bos_token_id": bos_id, "eos_token_id": eos_id,
                                              "do_sample": False}, indent=2),
        "tokenizer_config.json": json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
            "pad_token": PAD, "unk_token": None, "add_bos_token": True, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": 4096, "chat_template": CHAT_TEMPLATE,
            "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                              "normalized": False, "single_word": False}
                                     for t, i in ((BOS, bos_id), (EOS, eos_id), (PAD, pad_id))},
        }, indent=2),
        "special_tokens_map.json": json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2),
        "tokenizer.json": tok.to_str(),  # type: ignore[attr-defined]
    }
    # Write every file atomically, the marker last: a crash halfway leaves a directory that is remade.
    for name, text in files.items():
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / name)
    marker.write_text(json.dumps({"version": VERSION, "vocab_size": vocab}))
    return str(root)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m nalar.actors.models.tiny DIR", file=sys.stderr)
        return 2
    print(make_tiny_model(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
