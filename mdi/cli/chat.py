"""`mdi chat`: a conversation in the terminal, on one device or over a ring.

Each turn renders the whole conversation with the model's chat template and submits
it as one sequence to the engine (LocalEngine, or RingEngine over `--nodes N` local
processes or the nodes of `--nodes-config F`), streaming the answer as it comes.
`/reset` forgets the conversation, `/system TEXT` sets the system message, Ctrl-C
stops the answer being written (at the prompt it clears the line), Ctrl-D or `/bye`
quits.

A model without a chat template (the bundled character-level model) is given a plain
one, `User: ...` / `Assistant:` lines (PLAIN_TEMPLATE), and its answers end where it
starts the user's next line.

The engine runs on an event loop of its own thread (EngineThread): the terminal's
thread reads lines and receives Ctrl-C, which cancels the sequence being generated
(the engine frees its KV slot, on every node) and leaves the engine running. On one
device that thread also loads the model and computes every step, so that a single
thread runs torch's work (engine/compute_thread.py says why). With `--compile` that
thread also readies the compiled decode step's package after the load, before the
first prompt (engine/compiled_start.py: built once, about a minute on 2 cores, then
loaded from the cache), so no answer waits for it. Ctrl-C while the model loads or
the package builds quits at once (exit code 130), without waiting for either.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..checkpoint import load_model, open_checkpoint
from ..checkpoint.sampling_defaults import sampling_defaults
from ..engine.api import SeqHandle, SeqParams
from ..generate.sampling import SamplingConfig, sample_seed
from ..generate.stops import Stops
from ..model.cache import DEFAULT_MAX_CONTEXT
from ..tokenizer import Tokenizer
from .common import (CKPT_HELP, add_model_options, add_sampling_options, check_compile, check_counts,
                     load_options, sampling_config, set_threads, stops_of)
from .preflight import check_local_nodes

if TYPE_CHECKING:  # jinja2 is loaded only when a chat starts (not by every mdi command)
    from ..generate.chat_template import ChatTemplate

PLAIN_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
                  "{% else %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endif %}"
                  "{% endfor %}Assistant:")
PLAIN_STOP = "\nUser:"          # a plain model's answer ends where it writes the user's next line
DEFAULT_ANSWER_TOKENS = 512
PROMPT = ">>> "
HELP = ("/reset forgets the conversation, /system TEXT sets the system message (empty: none), "
        "/bye quits; Ctrl-C stops an answer, Ctrl-D quits")


@dataclass
class Conversation:
    """The messages so far and how they become a prompt (pure: no engine, no terminal)."""
    template: ChatTemplate
    tokenizer: Tokenizer
    context: int                       # positions a sequence may hold
    answer_tokens: int                 # room kept for the answer
    system: str = ""
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self, user: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns + [{"role": "user", "content": user}]

    def prompt(self, user: str) -> list[int]:
        """The conversation with `user`'s message, rendered and encoded; the oldest turns
        are left out while it leaves no room for the answer (ValueError: text the
        tokenizer cannot encode, or a message too long alone)."""
        dropped = 0
        while True:
            ids = self.tokenizer.encode(self.template.render(self.messages(user)))
            if len(ids) + min(self.answer_tokens, self.context // 2) <= self.context or not self.turns:
                break
            del self.turns[:2]  # one user message and its answer
            dropped += 1
        if dropped:
            print(f"(the {dropped} oldest exchange(s) left out: the context holds {self.context} "
                  "tokens)", file=sys.stderr)
        if len(ids) >= self.context:
            raise ValueError(f"the message is {len(ids)} tokens, the context holds {self.context}")
        return ids

    def add(self, user: str, answer: str) -> None:
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        self.turns.clear()


class EngineThread:
    """An engine on an event loop in a thread of its own; answer() streams one sequence
    and returns when it ends, a KeyboardInterrupt in the caller cancelling it."""

    def __init__(self, factory: Callable[[], Any], stop: threading.Event | None = None) -> None:
        """stop: set on a Ctrl-C during the start (factory may watch it: --compile's
        builds begin no further package)."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mdi-chat-engine",
                                       daemon=True)
        self.thread.start()
        self.engine = None
        self._current: SeqHandle | None = None

        async def start() -> Any:
            engine = factory()
            await engine.start()
            return engine
        starting = asyncio.run_coroutine_threadsafe(start(), self.loop)
        try:
            self.engine = starting.result()  # a lock wait: Ctrl-C interrupts it
        except KeyboardInterrupt:
            # Ctrl-C during the load: leave now. The load (factory(), on the loop's
            # thread or a ComputeThread, both daemons) cannot stop part way and goes
            # with the process; a ring's start stops at its next await.
            if stop is not None:
                stop.set()
            starting.cancel()
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise
        except BaseException:
            self.close()
            raise

    def answer(self, ids: list[int], params: SeqParams, write: Callable[[str], None]
               ) -> tuple[str, str | None]:
        """(the answer's text, its finish reason); the text is written as it comes."""
        async def run() -> tuple[str, str | None]:
            self._current = seq = self.engine.submit(ids, params)
            parts, reason = [], None
            async for ev in seq.events():
                if ev.text:
                    parts.append(ev.text)
                    write(ev.text)
                reason = ev.finish_reason or reason
            return "".join(parts), reason

        fut = asyncio.run_coroutine_threadsafe(run(), self.loop)
        try:
            return fut.result()  # a lock wait: Ctrl-C interrupts it
        except KeyboardInterrupt:
            self.loop.call_soon_threadsafe(self._cancel)
            return fut.result()  # the sequence ends "cancelled" at the next step

    def __enter__(self) -> "EngineThread":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _cancel(self) -> None:
        if self._current is not None:
            self._current.cancel()

    def close(self) -> None:
        if self.engine is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.engine.close(), self.loop).result()
            self.engine = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def chat_template(tok: Tokenizer) -> tuple[ChatTemplate, tuple[str, ...]]:
    """The model's template, or the plain one with its stop string."""
    from ..generate.chat_template import ChatTemplate, template_for

    template = template_for(tok)
    if template is not None:
        return template, ()
    return ChatTemplate(PLAIN_TEMPLATE), (PLAIN_STOP,)


def cmd_chat(args: argparse.Namespace) -> int:
    check_counts(args)
    ck = open_checkpoint(args.ckpt)
    ring = args.nodes_config is not None or args.nodes != 1
    if ring:
        from .ring import run_options

        run_options(args)  # --compile refused before a node starts
    else:
        check_compile(args)
    if args.nodes_config is None:
        check_local_nodes(args, ck)
        if args.nodes > 1:  # as mdi run: the machine's cores divided among the local nodes
            from ..ring.cluster.local_cluster import default_threads

            args.threads = args.threads or default_threads(args.nodes)
    set_threads(args.threads)
    tok = ck.tokenizer()
    conv, turn_params = _prepare(args, ck, tok)  # all of it before a model loads or a node starts
    with _engine(args, ck, tok, ring) as engine:
        return _converse(args, engine, conv, turn_params)


@contextlib.contextmanager
def _engine(args: argparse.Namespace, ck: Any, tok: Tokenizer, ring: bool) -> Iterator[EngineThread]:
    """The engine for the options: LocalEngine, or RingEngine over local or listed nodes."""
    if not ring:
        from ..engine.local import LocalEngine

        stop = threading.Event()  # a Ctrl-C at start: --compile begins no further package

        def local() -> LocalEngine:
            # on the engine's thread, which loads the model and computes every step itself
            # (compute_inline): one thread runs torch's OpenMP work, so libgomp keeps its
            # helpers spinning between parallel regions (engine/compute_thread.py)
            model = load_model(ck, load_options(args)).model
            if args.compile:  # its package ready before the first prompt, not in the answer
                from ..engine.compiled_start import prepare_compiled

                # the engine's one sequence: a cache of one row, the graph of 1 row
                prepare_compiled(model, 1, stop, before="the first prompt")
            engine = LocalEngine(model, tok, max_seqs=1, prefill_chunk=args.prefill_chunk)
            engine.compute_inline = True
            return engine
        with EngineThread(local, stop) as engine:
            yield engine
        return
    from ..ring.starter.ring_engine import RingEngine
    from .ring import nodes_and_token, run_options

    with nodes_and_token(args) as (nodes, token):
        with EngineThread(lambda: RingEngine(nodes, token, ck, tok, opts=run_options(args),
                                             max_seqs=1)) as engine:
            yield engine


def _prepare(args: argparse.Namespace, ck: Any, tok: Tokenizer
             ) -> tuple[Conversation, Callable[[int], SeqParams]]:
    """The conversation and each turn's parameters (the turn number seeds its draws)."""
    sampling, n_tokens = sampling_config(args, sampling_defaults(ck, tok), DEFAULT_ANSWER_TOKENS)
    template, extra_stops = chat_template(tok)
    base = stops_of(args, tok)
    stops = Stops(ids=base.ids, strings=base.strings + extra_stops)
    context = min(ck.config.block_size, args.max_context or DEFAULT_MAX_CONTEXT)
    conv = Conversation(template, tok, context, n_tokens, system=args.system or "")
    return conv, lambda turn: _params(sampling, n_tokens, stops, turn)


def _converse(args: argparse.Namespace, engine: EngineThread, conv: Conversation,
              turn_params: Callable[[int], SeqParams]) -> int:
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing and history for input()
        print(f"chatting with {args.ckpt}; {HELP}", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input(PROMPT)
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /bye quits)", file=sys.stderr)
            continue
        except EOFError:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if _command(text, conv):
                return 0
            continue
        try:
            ids = conv.prompt(text)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        answer, reason = engine.answer(ids, turn_params(turn), _write)
        turn += 1
        print("\n[stopped]" if reason == "cancelled" else "")
        conv.add(text, answer.strip())


def _command(text: str, conv: Conversation) -> bool:
    """Run a /command; True to quit."""
    name, _, rest = text.partition(" ")
    if name in ("/bye", "/exit", "/quit"):
        return True
    if name == "/reset":
        conv.reset()
        print("(conversation cleared)", file=sys.stderr)
    elif name == "/system":
        conv.system = rest.strip()
        print(f"(system message {'set' if conv.system else 'cleared'})", file=sys.stderr)
    else:
        print(f"unknown command {name}; {HELP}", file=sys.stderr)
    return False


def _params(sampling: SamplingConfig, n_tokens: int, stops: Stops, turn: int) -> SeqParams:
    return SeqParams(max_tokens=n_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                     top_p=sampling.top_p, seed=sample_seed(sampling.seed, turn),
                     stop=stops.strings, stop_ids=stops.ids)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def register(sub: argparse._SubParsersAction) -> None:
    from .ring import add_ring_options

    p = sub.add_parser("chat", help="a conversation in the terminal, on one device or a ring",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--ckpt", required=True, help=CKPT_HELP)
    p.add_argument("--system", default=None, metavar="TEXT", help="the system message")
    g = p.add_argument_group("generation")
    add_sampling_options(g, n_tokens=DEFAULT_ANSWER_TOKENS)
    add_model_options(g)
    add_ring_options(p)
    p.set_defaults(func=cmd_chat)

