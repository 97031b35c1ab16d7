"""Options and helpers shared by the generation commands."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from ..engine.scheduler import DEFAULT_PREFILL_CHUNK
from ..checkpoint import LoadOptions
from ..checkpoint.sampling_defaults import SamplingDefaults
from ..generate.sampling import SamplingConfig
from ..generate.stops import Stops
from ..model.cache import context_length
from ..model.dtypes import DTYPES, KV_DTYPES
from ..model.quant import QUANT_MODES
from ..results import GenerationResult, append_time_run, dump_json, write_plots
from ..tokenizer import Tokenizer

log = logging.getLogger("mdi")
CKPT_HELP = ("checkpoint: our directory, a Hugging Face model directory, hf:ORG/NAME[@REV], "
             "a .gguf file or a shipped model's name (`mdi models` lists what can be named)")
# One help text per option, whichever command has it.
DEVICE_HELP = "torch device, e.g. cpu, cuda, cuda:1"
DTYPE_HELP = "dtype the model computes in"
AUTO_DTYPE_HELP = ("dtype the model computes in; auto: bfloat16 where this device multiplies it "
                   "natively and a short probe finds it faster at 1 and 16 rows, else float32 "
                   "(the choice is logged and in --json; MDI_AUTO_DTYPE=NAME fixes it)")
DTYPE_CHOICES = [*sorted(DTYPES), "auto"]
THREADS_HELP = "torch threads (default: torch's; with --nodes N, per node)"
QUANTIZE_HELP = ("int8: weights as int8 with per-channel scales, quantized at load time on "
                 "every node (4x less weight memory than float32); int4 (-g64, -g128): "
                 "linear weights as 4-bit codes per group of 32 (64, 128) inputs, CPU only, a "
                 "GGUF's Q4 tensors kept as the file's codes (sent so to the nodes); none: "
                 "float weights. Default: a GGUF file's own precision on a CPU (int4 for Q4 "
                 "files, int8 for Q8_0, Q5 and Q6, float for F32/F16/BF16), float otherwise; a "
                 "checkpoint written by `mdi convert --quantize` runs in its own mode")
QUANTIZE_CHOICES = [*QUANT_MODES, "none"]
BATCH_INVARIANT_HELP = ("compute every sequence on its own (per-row GEMMs): its tokens then do "
                        "not depend on which sequences share its step, at a cost in speed")
SEED_HELP = "seed of the random draws"
COMPILE_HELP = ("compile the decode step ahead of time (AOTInductor; needs a C++ compiler): one "
                "package per row bucket, kept in ~/.cache/mdi/inductor/mdi-aoti; a first start "
                "pays a minute or more per bucket on a small CPU, a later one loads the package "
                "in a second or two. Prefill stays eager. Single-device only; not with "
                "--batch-invariant (docs/benchmarks.md has its figures)")
NODES_HELP = ("nodes of the ring, the starter (this process) included, each a local process; "
              "1: one device, no ring")
NODES_CONFIG_HELP = "the nodes JSON file of a cluster started by hand (`mdi node`)"
SPARES_HELP = ("extra local nodes that join the ring when one of its nodes fails (with --nodes 2 "
               "or more)")
RING_TIMEOUT_HELP = ("seconds of silence before a node counts as gone; the ring then re-plans over "
                     "the nodes still alive and the spares and goes on (see --no-recover)")
NO_RECOVER_HELP = ("when a node fails, stop instead of re-planning and resuming: run, starter and "
                   "chat end with exit status 3 and the text so far; serve fails the requests in "
                   "flight (500) and forms the ring again")
RECOVERY_HELP = ("how the ring recovers from a lost node: replay (a spare takes the lost node's "
                 "layers; the other nodes keep their stage and KV cache, and the node before it "
                 "replays the activations it sent, so only the lost layers are prefilled again; "
                 "the ring is formed anew when that cannot be done: two neighbours lost, no "
                 "spare) or reprefill (the ring is formed anew and every sequence's context "
                 "prefilled again through every layer)")
REPLAN_CHOICES = ("on", "off")  # --replan (ring/starter/replan.py)
REPLAN_HELP = ("on (default for a ring): when a stage stays 1.3x slower than the plan predicted "
               "(its own time a step once the ring formed, against the other stages') and a new "
               "split planned from the measured step times predicts the ring 1.2x faster, the "
               "boundary layers move between neighbours with their KV cache between steps "
               "(steps in flight are computed again; no re-prefill); where they cannot, the "
               "nodes are timed again and the ring formed anew, the sequences re-prefilled "
               "(greedy text unchanged either way). A split the user fixed (--partition even, "
               "layers in the nodes file) is not re-planned. off: the plan stays fixed")
PARTITION_HELP = ("how layers are split: auto times every node on the model's shape and "
                  "minimises the slowest stage under each node's memory; even gives equal "
                  "shares (default: auto when the nodes report different devices, CPUs or "
                  "memory caps, even otherwise; per-node 'layers' in the nodes file win)")
TOKEN_HELP = ("the cluster's shared secret (visible in the process list: prefer MDI_TOKEN or "
              "--token-file)")
TOKEN_FILE_HELP = "file holding the cluster's shared secret"
MODEL_DEFAULTS = ("`mdi inspect` shows them; a chat model that has none decodes greedily, "
                  "another samples at 0.8 with top-k 200")
DEFAULT_N_TOKENS = 1000


class UsageError(ValueError):
    """A bad command-line value, found before anything started: exit status 2, as for
    argparse's syntax errors (1 is for what fails later)."""
    exit_code = 2


PREFILL_CHUNK_HELP = ("prefill tokens per step at most: a longer prompt crosses the ring in chunks "
                     "(stage k on chunk i while stage k+1 is on chunk i-1) and decoding sequences "
                     "wait one chunk, not the whole prompt; 0: each prompt in one piece")


def add_prefill_chunk(p) -> None:
    """--prefill-chunk N (sample, run, starter, chat, serve)."""
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                   help=PREFILL_CHUNK_HELP)


def add_max_context(p) -> None:
    """--max-context N (sample, run, starter, serve, bench)."""
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="positions a sequence keeps (the KV cache's length): min(block_size, N); "
                        "past it the context window moves on. Default: min(block_size, 2048), so "
                        "a model with a huge block_size (SmolLM2: 8192) does not allocate that "
                        "much cache per sequence")


def add_sampling_options(g, n_tokens: int) -> None:
    """How tokens are drawn (sample, run, starter, chat); unset: the model's own settings."""
    g.add_argument("--n-tokens", type=int, default=None,
                   help=f"most new tokens per sample (default: the model's max_new_tokens, else "
                        f"{n_tokens})")
    g.add_argument("--temperature", type=float, default=None,
                   help=f"0 is greedy (default: the model's; {MODEL_DEFAULTS})")
    g.add_argument("--top-k", type=int, default=None,
                   help="keep the k likeliest tokens; 0: all (default: the model's)")
    g.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: keep the likeliest tokens up to this probability "
                        "mass; 1: all (default: the model's)")
    g.add_argument("--seed", type=int, default=1337, help=SEED_HELP)
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end a sample at this text (repeatable; the text before it is kept)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="generate --n-tokens even past the model's end-of-sequence token")


def add_kv_dtype(g) -> None:
    g.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), default=None,
                   help="what the KV caches store (default: the compute dtype); bfloat16 or "
                        "float16 halve a float32 run's cache, int8 (a float32 scale per "
                        "position and head) takes about a quarter (read back in the compute dtype "
                        "each step: a little slower, results close but not equal)")


def add_model_options(g) -> None:
    """Where and how the model runs (sample, run, starter, chat)."""
    g.add_argument("--device", default="cpu", help=DEVICE_HELP)
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=AUTO_DTYPE_HELP)
    g.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    g.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None, help=QUANTIZE_HELP)
    add_kv_dtype(g)
    add_max_context(g)
    add_prefill_chunk(g)
    g.add_argument("--batch-invariant", action="store_true", help=BATCH_INVARIANT_HELP)
    g.add_argument("--compile", action="store_true", help=COMPILE_HELP)


def add_generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--n-samples", type=int, default=3, help="samples to generate")
    g.add_argument("--prompt", action="append", default=None,
                   help="prompt text, or FILE:path with one prompt per line; repeat for one "
                        "prompt per sample (default: a newline)")
    g.add_argument("--chat", action="store_true",
                   help="each prompt is one user message in the model's chat template; samples "
                        "end at the template's end-of-turn token")
    g.add_argument("--truncate", choices=["left"], default=None,
                   help="a prompt longer than the context is refused; left: keep its last "
                        "tokens instead (the window moves on as in a long generation)")
    add_sampling_options(g, n_tokens=DEFAULT_N_TOKENS)
    add_model_options(g)
    o = p.add_argument_group("output")
    o.add_argument("--time-run", metavar="CSV", help="append one row of timings to this CSV")
    o.add_argument("--plots", metavar="DIR", help="write tokens-vs-time CSV and PNG to DIR")
    o.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def resolve_quantize(args: argparse.Namespace) -> None:
    """--quantize as a run takes it: "none" is float (None); no --quantize on a CPU
    is a GGUF file's own precision (checkpoint/gguf_precision.py), logged."""
    args.quantize_none = args.quantize == "none"  # asked for float outright
    if args.quantize_none:
        args.quantize = None
        return
    ckpt = getattr(args, "ckpt", None)
    if args.quantize is not None or not ckpt or torch.device(getattr(args, "device", "cpu")).type != "cpu":
        return
    from ..checkpoint.gguf_precision import file_mode

    args.quantize, weights = file_mode(ckpt)
    if args.quantize:
        log.info("%s holds %s weights: running them as --quantize %s, the file's precision "
                 "(--quantize none: float)", Path(str(ckpt)).name, weights, args.quantize)


def load_options(args: argparse.Namespace) -> LoadOptions:
    """How the generation commands load the model (add_generation_options)."""
    return LoadOptions(device=args.device, dtype=DTYPES[args.dtype], quantize=args.quantize,
                       batch_invariant=args.batch_invariant, max_context=args.max_context,
                       kv_dtype=KV_DTYPES[args.kv_dtype] if args.kv_dtype else None,
                       compile=check_compile(args))


def check_compile(args: argparse.Namespace) -> bool:
    """--compile, refused (before anything loads) with --batch-invariant."""
    on = getattr(args, "compile", False)
    if on and args.batch_invariant:
        raise UsageError("--compile with --batch-invariant: a compiled step's sums are Inductor's "
                         "choice, not one row at a time; use one or the other")
    return on


def compute_info(args: argparse.Namespace, stage=None) -> dict:
    """What --json says of how the run computes: the dtype, why it is that one
    (--dtype auto: cli/auto_dtype.py) and, for a stage held here, its kernels."""
    from ..model.quant import kernel_summary

    out = {"dtype": args.dtype, "dtype_from": getattr(args, "dtype_from", "--dtype")}
    if stage is not None:
        out["kernels"] = kernel_summary(stage)
    log.info("computing in %s (%s)%s", out["dtype"], out["dtype_from"], "".join(
        f"; {n} x {k}" for k, n in out.get("kernels", {}).items()))
    return out


def check_counts(args: argparse.Namespace) -> None:
    """--n-samples, --n-tokens and the sampling values the user set, checked before
    anything is loaded."""
    if getattr(args, "n_samples", 1) <= 0:
        raise UsageError(f"--n-samples must be positive, got {args.n_samples}")
    if getattr(args, "prefill_chunk", 0) < 0:
        raise UsageError(f"--prefill-chunk must be 0 (no chunks) or positive, got "
                         f"{args.prefill_chunk}")
    if args.n_tokens is not None and args.n_tokens <= 0:
        raise UsageError(f"--n-tokens must be positive, got {args.n_tokens}")
    try:  # SamplingConfig checks its fields; the model's own fill the unset ones later
        SamplingConfig(temperature=1.0 if args.temperature is None else args.temperature,
                       top_k=args.top_k or None, top_p=args.top_p)
    except ValueError as e:
        raise UsageError(str(e)) from None


def sampling_config(args: argparse.Namespace, defaults: SamplingDefaults,
                    n_tokens: int = DEFAULT_N_TOKENS) -> tuple[SamplingConfig, int]:
    """(sampling, new tokens per sample): what the user set, else the model's own settings
    (checkpoint/sampling_defaults.py), else n_tokens. --top-k 0 and --top-p 1 mean no cut."""
    check_counts(args)
    unset = [name for name in ("temperature", "top_k", "top_p") if getattr(args, name) is None]
    pick = {name: getattr(defaults, name) if name in unset else getattr(args, name)
            for name in ("temperature", "top_k", "top_p")}
    if unset:  # said when the choice that matters most, the temperature, was the model's
        log.log(logging.INFO if "temperature" in unset else logging.DEBUG,
                "sampling: %s from the model (%s)",
                ", ".join(f"{name} {pick[name]}" for name in unset), defaults.source)
    if pick["top_k"] == 0:
        pick["top_k"] = None
    if pick["top_p"] == 1:
        pick["top_p"] = None
    try:
        sampling = SamplingConfig(temperature=pick["temperature"], top_k=pick["top_k"],
                                  seed=args.seed, top_p=pick["top_p"])
    except ValueError as e:
        raise UsageError(str(e)) from None
    return sampling, args.n_tokens or defaults.max_new_tokens or n_tokens


def set_threads(n: int | None) -> None:
    if n is not None:
        if n <= 0:
            raise UsageError(f"--threads must be positive, got {n}")
        torch.set_num_threads(n)


def read_prompts(values: list[str] | None, n_samples: int) -> list[str]:
    """One prompt per sample from --prompt values (text or FILE:path, one per line)."""
    prompts: list[str] = []
    for v in values or ["\n"]:
        if v.startswith("FILE:"):
            path = Path(v[5:])
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"cannot read prompt file {path}: {e}") from None
            lines = [line for line in text.splitlines() if line.strip()]
            if not lines:
                raise UsageError(f"prompt file {path} has no non-empty line")
            prompts.extend(lines)
        else:
            prompts.append(v)
    if len(prompts) == 1:
        return prompts * n_samples
    if len(prompts) != n_samples:
        raise UsageError(f"got {len(prompts)} prompts for --n-samples {n_samples}: give one prompt, "
                         "or exactly one per sample")
    return prompts


def encode_prompts(tok: Tokenizer, prompts: list[str], chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt; with chat, each prompt is one user message rendered
    by the model's chat template (with the assistant's generation prompt)."""
    template = None
    if chat:
        from ..generate.chat_template import template_for

        template = template_for(tok)
        if template is None:
            raise UsageError("--chat: this model has no chat template")
    out = []
    for i, p in enumerate(prompts):
        try:
            ids = tok.encode(p if template is None
                             else template.render([{"role": "user", "content": p}]))
        except ValueError as e:
            raise UsageError(f"prompt {i}: {e}") from None
        if not ids:
            raise UsageError(f"prompt {i} encodes to no tokens")
        out.append(ids)
    return out


def check_prompt_lengths(ids: list[list[int]], block_size: int, max_context: int | None,
                         truncate: str | None) -> None:
    """A prompt longer than the context is refused, naming both numbers, unless
    --truncate left (then the context window keeps its last tokens, as generation does)."""
    if truncate == "left":
        return
    try:
        context = context_length(block_size, max_context)
    except ValueError as e:
        raise UsageError(f"--max-context: {e}") from None
    why = ("the model's block_size" if context == block_size
           else "--max-context" if max_context is not None else "the default --max-context")
    for i, p in enumerate(ids):
        if len(p) > context:
            raise UsageError(f"prompt {i} is {len(p)} tokens; the context holds {context} ({why}): "
                             f"shorten it{', raise --max-context' if context < block_size else ''} "
                             f"or pass --truncate left to keep its last tokens")


def stops_of(args: argparse.Namespace, tok: Tokenizer) -> Stops:
    """Where samples end early: the model's EOS / end-of-turn ids (unless --ignore-eos)
    and the --stop strings."""
    ids = () if args.ignore_eos else tuple(getattr(tok, "eos_ids", ()) or ())
    try:
        return Stops(ids=ids, strings=tuple(args.stop or ()))
    except ValueError as e:
        raise UsageError(f"--stop: {e}") from None


def emit(args: argparse.Namespace, result: GenerationResult, printed: bool = False) -> None:
    """Write the run's files and print it; printed: the text was streamed already."""
    if args.time_run:
        append_time_run(args.time_run, result)
    if args.plots:
        write_plots(args.plots, result)
    if args.json:
        print(dump_json(result))
        return
    if not printed:
        for prompt, text in zip(result.prompts, result.samples):
            sys.stdout.write(prompt + text + "\n---------------\n")
    print(result.summary(), file=sys.stderr)
