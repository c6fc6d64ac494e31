"""The `tiny` preset's own tokenizer and teacher, trained by the project on the same data and cached.

Why: tests, notebooks and a first demo must run in about a minute on a laptop CPU, without the 98 MB SmolLM2
download. So the tiny preset
- trains a small byte-level BPE tokenizer (HF `tokenizers`) on the rendered documents, with the ChatML special
  tokens and chat template SmolLM2 uses (no default system prompt) — on an evenly spread sample of at most
  TOKENIZER_SAMPLE_CHARS characters when the data are larger (a 1,024-token vocabulary is settled long before:
  training it on 50 MB would take minutes and GBs for the same merges), and
- trains a small full-precision LLaMA (`transformers.LlamaForCausalLM`) on the training windows.
Both are saved as an ordinary Hugging Face directory, so the rest of the pipeline loads this teacher exactly like a
user's own (`teacher.load_teacher`). Everything is seeded and keyed by a content hash, so a second run reuses it.
Runs that start together on a cold cache build each entry once: the first holds its lock (teacher.cache_lock), the
others wait, then load what it published with one atomic rename.
"""
from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Callable

import torch

from .data import Document, text_pieces
from .teacher import cache_dir, cache_lock, publish_folder, remove_leftovers

RECIPE_VERSION = "1"
TOKENIZER_SAMPLE_CHARS = 4 << 20
# SmolLM2's ChatML template without its default system prompt.
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _chatml(document: Document) -> str:
    if document.messages is None:
        return document.text + "<|im_end|>"
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in document.messages)


def tokenizer_sample(documents: list[Document], max_chars: int = TOKENIZER_SAMPLE_CHARS):
    """The rendered documents when they fit in `max_chars`; else pieces (≤ 64 KB, see data.text_pieces) taken
    evenly across all of them until ~max_chars characters: deterministic, and every part of the data is seen."""
    total = sum(doc.n_chars() for doc in documents)
    if total <= max_chars:
        yield from (_chatml(d) for d in documents)
        return
    credit = 0.0
    for document in documents:
        for piece in text_pieces(_chatml(document)):
            credit += len(piece) * max_chars / total
            if credit >= len(piece):
                credit -= len(piece)
                yield piece


def tiny_tokenizer(documents: list[Document], fingerprint: str, vocab_size: int = 1024,
                   log: Callable[[str], None] = print):
    """A byte-level BPE tokenizer trained on `documents` or a sample of them (cached by their fingerprint)."""
    # Saved as a PreTrainedTokenizerFast, so reopened as one: AutoTokenizer would first resolve the class through
    # transformers' model registry (~1.1 CPU-s more of every training start) to arrive at the same object.
    from transformers import PreTrainedTokenizerFast

    recipe = f"{RECIPE_VERSION}|{fingerprint}|{vocab_size}"
    if sum(doc.n_chars() for doc in documents) > TOKENIZER_SAMPLE_CHARS:
        recipe += f"|sample{TOKENIZER_SAMPLE_CHARS}"           # small data keep their earlier cache key
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    folder = cache_dir() / "tiny" / f"tokenizer-{key}"
    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    with cache_lock(folder, "the tokenizer", log):
        if not (folder / "tokenizer.json").is_file():     # else another run trained it while this one waited
            remove_leftovers(folder)
            _train_tokenizer(documents, folder, vocab_size, log)
    return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)


def _train_tokenizer(documents: list[Document], folder: Path, vocab_size: int, log: Callable[[str], None]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    start = time.time()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(tokenizer_sample(documents), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    publish_folder(folder, tokenizer.save_pretrained)
    log(f"tiny tokenizer ({vocab_size} tokens) trained in {time.time() - start:.1f} s")


def tiny_teacher_dir(tokenizer, dataset, *, hidden_size: int = 128, layers: int = 2, heads: int = 4,
                     steps: int = 200, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                     log: Callable[[str], None] = print,
                     progress: Callable[[int, int], None] | None = None) -> Path:
    """Train (once) a small LLaMA teacher on the training windows; return its HF directory.

    `progress(done, total)` is called after every training step (a caller that wants to stop raises from it, or
    from its signal handler: nothing half-built is left and the lock is released)."""
    recipe = f"{RECIPE_VERSION}|{dataset.fingerprint}|{len(tokenizer)}|{hidden_size}|{layers}|{heads}|{steps}|" \
             f"{batch_size}|{lr}|{seed}"
    folder = cache_dir() / "tiny" / f"teacher-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}"
    if (folder / "config.json").is_file():
        return folder
    with cache_lock(folder, "the teacher", log):
        if not (folder / "config.json").is_file():        # else another run trained it while this one waited
            remove_leftovers(folder)
            _train_teacher(tokenizer, dataset, folder, hidden_size=hidden_size, layers=layers, heads=heads,
                           steps=steps, batch_size=batch_size, lr=lr, seed=seed, log=log, progress=progress)
    return folder


def _train_teacher(tokenizer, dataset, folder: Path, *, hidden_size: int, layers: int, heads: int, steps: int,
                   batch_size: int, lr: float, seed: int, log: Callable[[str], None],
                   progress: Callable[[int, int], None] | None) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.time()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(dataset.seq_len, 64), tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, rope_theta=10000.0)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():          # do not disturb the caller's RNG streams
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    windows = dataset.vocab[dataset.train.tokens]   # teacher (tokenizer) ids
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        rows = torch.randint(0, len(windows), (batch_size,), generator=generator)
        batch = windows[rows]
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
        if progress is not None:
            progress(step + 1, steps)
    model.eval()

    def save(path: Path) -> None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)

    publish_folder(folder, save)
    log(f"tiny teacher ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters) trained in "
        f"{time.time() - start:.1f} s, final training loss {loss_value:.3f}")
