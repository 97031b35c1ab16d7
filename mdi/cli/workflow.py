"""Single-device commands: prepare, train, sample, inspect, convert."""
from __future__ import annotations

import argparse
import json
import logging

from tqdm import tqdm

from ..checkpoint import load_model, open_checkpoint
from ..checkpoint.sampling_defaults import sampling_defaults
from ..model import GPTConfig
from ..results import Texts
from .common import (CKPT_HELP, DEVICE_HELP, DTYPE_HELP, DTYPES, SEED_HELP, THREADS_HELP,
                     UsageError, add_generation_options, check_compile, check_counts,
                     check_prompt_lengths, compute_info, emit, encode_prompts, load_options, read_prompts,
                     sampling_config, set_threads, stops_of)
from .preflight import check_fits_here

log = logging.getLogger("mdi")


def cmd_prepare(args: argparse.Namespace) -> int:
    from ..data import prepare

    meta = prepare(args.input, args.out, args.tokenizer, args.vocab_size, args.val_fraction)
    print(json.dumps(meta, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..data import Dataset
    from ..train import TrainConfig, train

    set_threads(args.threads)
    cfg = TrainConfig(batch_size=args.batch_size, grad_acc_steps=args.grad_acc_steps,
                      max_iters=args.max_iters, lr=args.lr, min_lr=args.min_lr,
                      warmup_iters=args.warmup_iters, lr_decay_iters=args.lr_decay_iters,
                      weight_decay=args.weight_decay,
                      eval_interval=args.eval_interval, eval_iters=args.eval_iters,
                      seed=args.seed, device=args.device, dtype=args.dtype)
    model_config = None
    if not args.resume:
        vocab = Dataset.load(args.data).tokenizer.vocab_size
        model_config = GPTConfig(vocab_size=vocab, block_size=args.block_size, n_layer=args.n_layer,
                                 n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
                                 bias=args.bias)
    summary = train(args.data, args.out, model_config, cfg, resume=args.resume, plot=args.plot)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from ..engine.batch import generate_local
    from ..engine.local import LocalEngine
    from .stream import StreamPrinter

    check_counts(args)
    check_compile(args)
    lanes = 1 if args.micro_batches is None else args.micro_batches
    if lanes <= 0:
        raise UsageError(f"the number of micro-batches must be positive, got {lanes}")
    set_threads(args.threads)
    prompts = read_prompts(args.prompt, args.n_samples)
    ck = open_checkpoint(args.ckpt)
    check_fits_here(ck, len(prompts), args.dtype, args.max_context, args.quantize, args.device,
                    args.kv_dtype)
    loaded = load_model(ck, load_options(args))
    model, tok = loaded.model, loaded.tokenizer
    ids = encode_prompts(tok, prompts, chat=args.chat)
    check_prompt_lengths(ids, model.config.block_size, args.max_context, args.truncate)
    if args.chat:  # the answer starts on a line of its own
        prompts = [p + "\n" for p in prompts]
    stops = stops_of(args, tok)
    sampling, n_tokens = sampling_config(args, sampling_defaults(loaded.checkpoint, tok))
    # text streams to stdout as it comes; --json prints one object at the end (with a progress bar)
    printer = None if args.json else StreamPrinter(prompts)
    bar = tqdm(total=n_tokens, unit="tok", disable=None if args.json else True,
               desc="generating", leave=False)
    counts = [0] * len(ids)

    def on_event(i: int, ev) -> None:
        if printer is not None:
            printer(i, ev)
        if ev.token is not None:
            counts[i] += 1
            if min(counts) > bar.n:
                bar.update(min(counts) - bar.n)

    compute = compute_info(args, model)  # logged once the run is sure to start
    with bar:
        result = generate_local(
            lambda: LocalEngine(model, tok, max_seqs=len(ids), lanes=lanes,
                                prefill_chunk=args.prefill_chunk),
            ids, n_tokens, sampling, on_event, Texts(tok, prompts), stops)
    result.compute = compute
    emit(args, result, printed=printer is not None)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..checkpoint.inspect import inspect_checkpoint

    ins = inspect_checkpoint(args.ckpt)  # read completely before printing: a bad file prints nothing
    print(f"checkpoint: {ins.path}" + ("" if ins.kind == "mdi" else f" ({ins.kind})"))
    print("model config:")
    for k, v in ins.config.items():
        print(f"  {k}: {v}")
    print("tensors:")
    for t in ins.tensors:
        print(f"  {t.name:48s} {str(t.shape):20s} {t.dtype}")
    print(f"parameters: {ins.n_params:,} ({ins.n_params / 1e6:.2f}M)")
    print(f"tokenizer: {ins.tokenizer}")
    if ins.sampling is not None:
        print(f"sampling defaults: {ins.sampling.describe()}")
    if ins.training:
        print("training:")
        for k, v in ins.training.items():
            print(f"  {k}: {v}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="encode a text file into train/val token files")
    p.add_argument("--input", required=True, help="UTF-8 text file")
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument("--tokenizer", choices=["char", "bpe"], default="char",
                   help="char: one token per character; bpe: byte-level BPE of --vocab-size")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default 1000)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the text (its end) kept for validation")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a GPT from scratch or resume")
    p.add_argument("--data", required=True, help="data directory from `mdi prepare`")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--n-layer", type=int, default=6, help="transformer blocks")
    p.add_argument("--n-head", type=int, default=6, help="attention heads per block")
    p.add_argument("--n-embd", type=int, default=384, help="embedding width")
    p.add_argument("--block-size", type=int, default=256, help="context length in tokens")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout probability while training")
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True,
                   help="biases in the linear layers and norms")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per micro-step")
    p.add_argument("--grad-acc-steps", type=int, default=1,
                   help="micro-steps whose gradients add up to one optimizer step")
    p.add_argument("--max-iters", type=int, default=2000, help="optimizer steps in all")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (after warmup)")
    p.add_argument("--min-lr", type=float, default=1e-4, help="learning rate at the cosine's end")
    p.add_argument("--warmup-iters", type=int, default=100, help="steps of linear warmup")
    p.add_argument("--lr-decay-iters", type=int, default=None,
                   help="iteration where the cosine reaches --min-lr (default --max-iters); keep it "
                        "fixed to extend a finished run with a larger --max-iters")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of 2-D weights")
    p.add_argument("--eval-interval", type=int, default=250,
                   help="steps between evaluations (each keeps the best checkpoint)")
    p.add_argument("--eval-iters", type=int, default=50, help="batches per split per evaluation")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help=DTYPE_HELP)
    p.add_argument("--seed", type=int, default=1337, help=SEED_HELP)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--plot", action="store_true", help="also write OUT/loss.png")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate on one device (the baseline)")
    p.add_argument("--ckpt", required=True, help=CKPT_HELP)
    add_generation_options(p)
    p.add_argument("--micro-batches", type=int, default=None,
                   help="split the samples into this many batches (default 1; tokens do not depend on it)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("inspect", help="print a checkpoint's structure")
    p.add_argument("ckpt", help=CKPT_HELP)
    p.set_defaults(func=cmd_inspect)
