"""Write a tiny random-weight Llama model with a chat-capable tokenizer.

No model hub is reachable from CI or air-gapped controllers, yet the vLLM
scenario must serve a real Hugging Face checkpoint and answer a real completion.
This builds one locally: a byte-level BPE tokenizer trained on a few sentences
(wrapped as ``PreTrainedTokenizerFast`` with a chat template) and a
``LlamaForCausalLM`` with random weights, saved with ``save_pretrained``.

vLLM's CPU attention only supports head sizes 32, 64, 80, ... 256, 512, so the
head size is 32 by default and the script refuses anything CPU vLLM cannot load.

Output: ``$LLMSTACK_CACHE/models/tiny-llama-hf/`` (``LLMSTACK_CACHE`` defaults to
the checkout's ``.cache``). The write is atomic (built in a sibling directory,
then renamed) and skipped when a complete model with the same recipe exists.

It needs ``torch``, ``transformers`` and ``tokenizers``. When the running Python
lacks them, it creates ``$LLMSTACK_CACHE/venvs/hf-tools`` with the pinned
versions below and re-runs itself there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOL_REQUIREMENTS = ("transformers==5.19.0", "tokenizers==0.23.3", "torch==2.13.0")
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, how can I help you today?",
    "vLLM serves large language models with paged attention.",
    "An inference node answers chat completions over HTTP.",
    "Say hello from the tiny test model.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9, and punctuation! ? ; :",
)
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (UNK, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("LLMSTACK_CACHE", REPO_ROOT / ".cache"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--output", type=Path, default=cache_dir() / "models" / "tiny-llama-hf")
    parser.add_argument("--head-dim", type=int, default=32, choices=CPU_HEAD_SIZES)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=320)
    parser.add_argument("--max-positions", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--force", action="store_true", help="rebuild even when an identical model exists")
    return parser.parse_args(argv)


def recipe_digest(args: argparse.Namespace) -> str:
    recipe = {
        "head_dim": args.head_dim,
        "heads": args.heads,
        "layers": args.layers,
        "vocab_size": args.vocab_size,
        "max_positions": args.max_positions,
        "seed": args.seed,
        "corpus": CORPUS,
        "special": SPECIAL_TOKENS,
        "template": CHAT_TEMPLATE,
        "script": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def ensure_dependencies() -> None:
    try:
        import tokenizers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        tool_venv = cache_dir() / "venvs" / "hf-tools"
        python = tool_venv / "bin" / "python"
        if Path(sys.prefix).resolve() == tool_venv.resolve():
            raise
        if not python.exists():
            venv.create(tool_venv, with_pip=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TOOL_REQUIREMENTS], check=True)
        # Re-run this same script inside the tool venv (argv list, no shell).
        os.execv(str(python), [str(python), __file__, *sys.argv[1:]])  # noqa: S606


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=UNK))
    # Byte-level pre-tokenization means any prompt encodes without <unk>.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(args: argparse.Namespace, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    hidden = args.heads * args.head_dim
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    return LlamaForCausalLM(config).to(torch.float32)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if (args.heads * args.head_dim) % args.heads:
        raise SystemExit("hidden size must be a multiple of the head count")
    digest = recipe_digest(args)
    stamp = args.output / ".recipe"
    if not args.force and stamp.is_file() and stamp.read_text().strip() == digest:
        print(f"{args.output}: up to date")
        return 0
    ensure_dependencies()
    staging = args.output.with_name(args.output.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = build_tokenizer(args.vocab_size)
    model = build_model(args, tokenizer)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / ".recipe").write_text(digest + "\n")
    # World-readable: the lab bind-mounts this read-only for an unprivileged service user.
    for path in [staging, *staging.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(args.output, ignore_errors=True)
    staging.rename(args.output)
    print(f"{args.output}: written (head_dim={args.head_dim}, vocab={len(tokenizer)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
