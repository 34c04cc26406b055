"""Build a tiny, real Llama model on local disk for tests, benchmarks and the README.

There is no model hub in our environments, so everything that needs a model
vLLM can actually load (integration tests, benchmarks, the README quick start)
builds this one instead. It is a genuine ``LlamaForCausalLM`` with random
weights (2 layers, hidden size 64) plus a byte-level BPE tokenizer trained on
a few lines of embedded text, and a chat template so ``/v1/chat/completions``
works. Its output is gibberish; it exists to exercise the serving path cheaply.

Usage::

    python -m tests.tiny_model DIR      # builds into DIR, prints the path

or from Python: ``build_tiny_model(pathlib.Path(DIR))``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile

__all__ = ["build_tiny_model"]

# Written last: its presence means the directory is a finished build.
_MARKER = ".complete"

_SEED = 1234
_VOCAB_SIZE = 512

_BOS = "<s>"
_EOS = "</s>"
_UNK = "<unk>"
_PAD = "<pad>"

# Minimal ChatML-like template; only needs to render messages into a prompt.
_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Training text for the tokenizer. Content barely matters; it just has to
# produce a stable vocabulary of ~512 tokens so prompts tokenize sensibly.
_CORPUS = """\
The quick brown fox jumps over the lazy dog.
Hello, world! This is a tiny language model used for testing.
A server should answer requests quickly and report its health.
The launcher starts several instances and balances the load between them.
Each instance listens on its own port and serves the same model.
When a process dies, the supervisor restarts it after a short delay.
Benchmarks measure latency, throughput and time to first token.
Tokens are generated one at a time until the limit is reached.
The weather today is sunny with a light breeze from the west.
She opened the window and looked at the garden full of flowers.
He wrote a letter to his friend and mailed it in the morning.
Numbers like 1, 2, 3, 42 and 2024 appear in many documents.
What time is it? It is half past seven in the evening.
Please summarize the following paragraph in one sentence.
You are a helpful assistant. Answer the question briefly.
The cat sat on the mat and watched the birds outside.
Computers store information as bits, which are zeros and ones.
Python is a programming language that is easy to read and write.
A model reads a prompt and predicts the next word in the text.
The train leaves the station at nine and arrives at noon.
Water boils at one hundred degrees Celsius at sea level.
Good morning! How are you doing today? I am fine, thank you.
The library was quiet except for the sound of turning pages.
Mountains, rivers and forests cover much of the northern land.
Memory, threads and caches all affect how fast a program runs.
Requests arrive over HTTP and responses are returned as JSON.
If the health check fails, the instance is removed from the pool.
Small tests run fast; large tests give more confidence.
The children played football in the park until it got dark.
Music filled the room as the band began to play a new song.
Write a short story about a robot who learns to paint.
Translate the sentence into French: the book is on the table.
List three colors: red, green and blue.
Once upon a time there was a king who lived in a castle.
The market opens early and closes late on Saturdays.
An apple a day keeps the doctor away, or so they say.
Errors should never pass silently unless explicitly silenced.
Simple is better than complex, and complex is better than complicated.
The end of the file is reached, and the reader stops.
"""


def _build_tokenizer(out_dir: pathlib.Path) -> int:
    """Train and save the tokenizer; return its actual vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=_UNK))
    # Byte-level: any input string is encodable, so test prompts never fail.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=[_UNK, _BOS, _EOS, _PAD],  # fixed ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Single-threaded training keeps merges (and thus ids) deterministic.
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=_BOS,
        eos_token=_EOS,
        unk_token=_UNK,
        pad_token=_PAD,
        model_max_length=512,
    )
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return len(fast)


def _build_weights(out_dir: pathlib.Path, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(_SEED)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: supported by vLLM's CPU attention
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
        # bfloat16: what vLLM CPU serves by default; also halves the file size.
        dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id).save_pretrained(str(out_dir))


def _world_readable(folder: pathlib.Path) -> None:
    """Files 0644, the folder 0755: a server running as another user (a container's arbitrary UID)
    reads the model. safetensors writes its file 0600, and vLLM then fails with a misleading
    ``FileNotFoundError`` for it."""
    folder.chmod(0o755)
    for entry in folder.iterdir():
        if entry.is_file():
            entry.chmod(0o644)


def build_tiny_model(target: pathlib.Path) -> pathlib.Path:
    """Build the tiny model into ``target`` (if not already built) and return it."""
    target = pathlib.Path(target)
    if (target / "config.json").is_file() and (target / _MARKER).is_file():
        if target.stat().st_uid == os.getuid():
            _world_readable(target)  # built by an older version of this file
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir (same filesystem) so the final rename is
    # atomic and a crashed/concurrent build never leaves a half-written model.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        from transformers import PreTrainedTokenizerFast

        _build_tokenizer(tmp)
        tok = PreTrainedTokenizerFast.from_pretrained(str(tmp))
        _build_weights(tmp, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        (tmp / _MARKER).write_text("ok\n")
        _world_readable(tmp)  # mkdtemp makes the folder 0700

        if target.exists():
            if (target / "config.json").is_file() and (target / _MARKER).is_file():
                # Another builder won the race; keep its result.
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            # Leftover incomplete build (or empty dir): replace it.
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            # Lost a race to a concurrent builder that renamed first.
            if not (target / _MARKER).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tests.tiny_model DIR", file=sys.stderr)
        return 2
    print(build_tiny_model(pathlib.Path(args[0]).resolve()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
