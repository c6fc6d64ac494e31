"""Talk to a finished run's student next to its teacher: `python -m hybrid_optimization.chat RUN_ID`.

The workbench's Chat page (workbench/pages/chat.py) uses the same pieces:
  ChatModels.from_run(run_id)    the run's packed student (bit-exact, `--export`), its tokenizer and its teacher
  models.stream(who, messages, settings)   yields Token(text, ...) one generated token at a time
The chat template of the run's tokenizer is applied to the messages; generation samples with temperature and
top-p (temperature 0: greedy) and stops at the end-of-turn token or after `max_new_tokens`.

The student knows only the tokens its training data used (its restricted vocabulary): a prompt token outside it is
dropped (the count is reported), and the student only ever generates tokens of its vocabulary. Its context is its
training window (`max_seq_len`); the teacher's is its `max_position_embeddings` less the answer's length. A longer
prompt keeps its last tokens (so a long history or message answers as fast as a short one), and one message is
at most MAX_MESSAGE_CHARS characters: longer text is refused with a message, not tokenized.

The command line checks its arguments (settings, message, run id, runs root) before torch is imported: a bad one
answers in one line, exit code 2.

Generation runs with one torch thread (`THREADS`): these models are small, and on a shared 2-core machine a second
intra-op thread makes each tiny matmul wait for a core (measured here: 117 vs 4.5 tokens/s for the tiny student).
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .config import MAX_SEED

if TYPE_CHECKING:
    import torch
from .schema import RUN_ID_PATTERN, RunsRootError, check_runs_root

WHO = ("student", "teacher")
THREADS = 1
MAX_MESSAGE_CHARS = 20_000      # one chat message (the Chat page uses the same bound)
MAX_NEW_TOKENS = 1024


class ChatInputError(ValueError):
    """A chat setting or message that cannot be used; the message names it and what is allowed."""


def check_message(text: str) -> None:
    """A chat message must be text of at most MAX_MESSAGE_CHARS characters."""
    if not isinstance(text, str):
        raise ChatInputError(f"a chat message must be text, not {type(text).__name__}")
    if len(text) > MAX_MESSAGE_CHARS:
        raise ChatInputError(f"the message has {len(text):,} characters; at most {MAX_MESSAGE_CHARS:,} are allowed "
                             "(the models' context holds far fewer tokens)")


@dataclass
class Settings:
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 64
    seed: int | None = 0

    def check(self) -> None:
        number = (int, float)
        if not (isinstance(self.temperature, number) and 0 <= self.temperature <= 5):
            raise ChatInputError(f"temperature {self.temperature} is invalid: it must be in [0, 5] (0 = greedy)")
        if not (isinstance(self.top_p, number) and 0 < self.top_p <= 1):
            raise ChatInputError(f"top_p {self.top_p} is invalid: it must be in (0, 1]")
        if not (isinstance(self.max_new_tokens, int) and 1 <= self.max_new_tokens <= MAX_NEW_TOKENS):
            raise ChatInputError(f"max_new_tokens {self.max_new_tokens} is invalid: it must be an integer in "
                                 f"[1, {MAX_NEW_TOKENS}]")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED):
            raise ChatInputError(f"seed {self.seed} is invalid: it must be an integer in [0, {MAX_SEED:,}]")


@dataclass
class Token:
    text: str                 # the newly decoded text (may be "" while a multi-byte character is incomplete)
    token_id: int             # tokenizer id
    index: int                # 0 for the first generated token
    elapsed_s: float          # since the request started


@dataclass
class Answer:
    text: str = ""
    n_tokens: int = 0
    first_token_s: float | None = None
    total_s: float = 0.0
    dropped_prompt_tokens: int = 0
    cut_prompt_tokens: int = 0      # the prompt's oldest tokens beyond the model's context window
    stop_reason: str = ""
    tokens: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.total_s if self.total_s > 0 else 0.0

    def stats_line(self) -> str:
        first = f"first token {self.first_token_s:.3f} s · " if self.first_token_s is not None else ""
        dropped = (f" · {self.dropped_prompt_tokens} prompt token(s) unknown to the student dropped"
                   if self.dropped_prompt_tokens else "")
        return f"{self.n_tokens} tokens · {self.tokens_per_s:.1f} tokens/s · {first}{self.stop_reason}{dropped}"


class ChatModels:
    """The student (restricted vocabulary) and the teacher (full vocabulary) of one run, sharing its tokenizer."""

    def __init__(self, student, vocab: "torch.Tensor", tokenizer, teacher=None, description: str = ""):
        import torch
        self.student = student.eval()
        self.vocab = vocab.long()
        self.to_student = torch.full((max(len(tokenizer), int(vocab.max()) + 1),), -1, dtype=torch.long)
        self.to_student[self.vocab] = torch.arange(self.vocab.numel())
        self.tokenizer = tokenizer
        self.teacher = teacher.eval() if teacher is not None else None
        self.description = description
        self.stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
                         if isinstance(i, int) and i >= 0}

    @classmethod
    def from_run(cls, run_id: str, runs_root=None, with_teacher: bool = True) -> "ChatModels":
        from .distill.export import ExportError
        from .distill.run_export import find_trained_student
        try:
            packed = find_trained_student(run_id, runs_root)
        except ExportError as exc:      # the export's words ("cannot export run …") said for a chat
            raise ExportError(str(exc).replace("cannot export run", "cannot chat with run", 1)) from None
        return cls.from_packed(packed, with_teacher=with_teacher)

    @classmethod
    def from_packed(cls, packed: str | Path, with_teacher: bool = True) -> "ChatModels":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from .distill.export import ExportError, load_exported_student
        student, metadata = load_exported_student(packed)
        folder = Path(metadata.get("tokenizer_dir") or "")
        if not (folder / "tokenizer.json").is_file():
            raise ExportError(f"the run's tokenizer folder {folder} is gone (cache cleared?); train the run again")
        hf_logging.disable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        teacher = None
        if with_teacher and (folder / "config.json").is_file():
            teacher = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        return cls(student, torch.tensor(metadata["vocab"]), tokenizer, teacher,
                   description=f"run {metadata.get('run_id', '?')} · preset {metadata.get('preset', '?')} · "
                               f"teacher {metadata.get('teacher', '?')}")

    # -- generation ---------------------------------------------------------------------------------------------
    def prompt_ids(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):    # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def context_window(self, who: str, max_new_tokens: int) -> int:
        """Prompt tokens `who` can see: its context less the answer's room (at least half the context)."""
        if who == "student":
            return int(self.student.config.max_seq_len)
        context = int(getattr(self.teacher.config, "max_position_embeddings", 0) or 2048)
        return max(context // 2, context - max_new_tokens)

    def stream(self, who: str, messages: list[dict], settings: Settings | None = None,
               answer: Answer | None = None) -> Iterator[Token]:
        """Generate the reply of `who` ("student" or "teacher") token by token; `answer` collects the totals."""
        import torch
        settings = settings or Settings()
        settings.check()
        for message in messages:
            check_message(message.get("content", ""))
        answer = answer if answer is not None else Answer()
        if who == "teacher" and self.teacher is None:
            raise ValueError("this run's teacher cannot be loaded for chat (no model in its folder)")
        generator = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
        start = time.perf_counter()
        prompt = self.prompt_ids(messages)
        answer.cut_prompt_tokens = max(0, len(prompt) - self.context_window(who, settings.max_new_tokens))
        prompt = prompt[answer.cut_prompt_tokens:]          # the end of the conversation: what is answered
        step = self._student_steps(prompt, answer) if who == "student" else self._teacher_steps(prompt)
        answer.stop_reason = f"max_new_tokens ({settings.max_new_tokens})"
        threads = torch.get_num_threads()
        torch.set_num_threads(THREADS)
        try:
            yield from self._generate(who, step, settings, generator, answer, start)
        finally:
            torch.set_num_threads(threads)
            answer.total_s = time.perf_counter() - start

    def _generate(self, who, step, settings, generator, answer, start) -> Iterator[Token]:
        import torch
        generated: list[int] = []
        shown = ""
        with torch.inference_mode():
            for index in range(settings.max_new_tokens):
                logits = next(step) if index == 0 else step.send(generated[-1])
                token = int(_sample(logits, settings.temperature, settings.top_p, generator))
                if who == "student":
                    token = int(self.vocab[token])
                if token in self.stop_ids:
                    answer.stop_reason = "end of turn"
                    break
                generated.append(token)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                delta = ""
                # Byte-level BPE: a token may end inside a multi-byte character ("\ufffd" until it completes).
                if not text.endswith("\ufffd") and text.startswith(shown):
                    delta, shown = text[len(shown):], text
                elapsed = time.perf_counter() - start
                if answer.first_token_s is None:
                    answer.first_token_s = elapsed
                answer.text, answer.n_tokens, answer.tokens = shown, len(generated), list(generated)
                answer.total_s = elapsed
                yield Token(delta, token, index, elapsed)

    def reply(self, who: str, messages: list[dict], settings: Settings | None = None) -> Answer:
        answer = Answer()
        for _ in self.stream(who, messages, settings, answer):
            pass
        return answer

    def _student_steps(self, prompt: list[int], answer: Answer):
        """A coroutine: yields next-token logits over the student's vocabulary, receives each chosen token id."""
        import torch
        known = [int(self.to_student[t]) for t in prompt if t < self.to_student.numel() and self.to_student[t] >= 0]
        answer.dropped_prompt_tokens = len(prompt) - len(known)
        ids = known or [0]
        window = self.student.config.max_seq_len
        while True:
            logits = self.student(torch.tensor([ids[-window:]]))[0, -1]
            token = yield logits
            ids.append(int(self.to_student[token]))

    def _teacher_steps(self, prompt: list[int]):
        import torch
        out = self.teacher(torch.tensor([prompt]), use_cache=True)
        while True:
            token = yield out.logits[0, -1]
            out = self.teacher(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)


def _sample(logits: "torch.Tensor", temperature: float, top_p: float, generator) -> int:
    import torch
    logits = logits.float()
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p      # the smallest prefix reaching top_p (≥ 1 token)
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


# -- the command line -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from .distill.options import OneLineParser as _Parser
    from .progname import command_name
    p = _Parser(prog=command_name("hybrid_optimization.chat"),       # hybrid-chat, or python -m ...
                description="Chat with a finished run's student, its teacher answering beside it.")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--message", metavar="TEXT", help="ask one question and exit (default: interactive)")
    p.add_argument("--temperature", type=float, default=Settings.temperature, help="0 = greedy (default 0.7)")
    p.add_argument("--top_p", type=float, default=Settings.top_p, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--max_new_tokens", type=int, default=Settings.max_new_tokens, help="answer length cap (64)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--no_teacher", action="store_true", help="only the student answers")
    p.add_argument("--runs_root", metavar="DIR", help="run store folder (default $HYBRID_RUNS_ROOT or "
                   "~/.cache/hybrid-workbench/runs)")
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    settings = Settings(args.temperature, args.top_p, args.max_new_tokens, args.seed)
    try:                                # every argument checked before torch is imported
        settings.check()
        if args.message is not None:
            check_message(args.message)
            if not args.message.strip():
                raise ChatInputError("--message is empty: ask a question, or leave --message out to chat")
        if not re.fullmatch(RUN_ID_PATTERN, args.run_id):
            raise ChatInputError(f"run id {args.run_id[:80]!r} is invalid: a run id is letters, digits, '.', '_' "
                                 "and '-' (see the workbench or runs.db)")
        if args.runs_root is not None:
            check_runs_root(args.runs_root, must_exist=True, writable=False)
    except (ChatInputError, RunsRootError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        models = ChatModels.from_run(args.run_id, args.runs_root, with_teacher=not args.no_teacher)
    except (ValueError, LookupError, RuntimeError, OSError) as exc:   # no trained student, failed run, no store
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    print(f"Chat with {models.description} (Ctrl-D to quit)" if args.message is None else models.description)
    history: list[dict] = []
    while True:
        if args.message is not None:
            text = args.message
        else:
            try:
                text = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not text:
                continue
        history.append({"role": "user", "content": text})
        for who in WHO if models.teacher is not None else WHO[:1]:
            answer = Answer()
            print(f"{who}> ", end="", flush=True)
            for token in models.stream(who, history, settings, answer):
                print(token.text, end="", flush=True)
            print(f"\n    [{answer.stats_line()}]", flush=True)
            if who == "student":
                reply = answer.text
        history.append({"role": "assistant", "content": reply})
        if args.message is not None:
            return 0


if __name__ == "__main__":
    sys.exit(main())
