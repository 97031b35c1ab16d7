"""Progress where a user waits: training evaluation batch by batch, local nodes as they
answer, and `mdi serve` announcing its URL only once its startup (engine, ring) is done."""
from __future__ import annotations

import asyncio
import http.server
import logging
import threading
from types import SimpleNamespace

import torch

import mdi.train as train_mod
from mdi.cli.serve import announce_when_ready
from mdi.data import Dataset
from mdi.model import GPT, GPTConfig
from mdi.ring.cluster.local_cluster import wait_healthy
from mdi.train import TrainConfig


def test_evaluation_reports_every_batch(char_data_dir):
    data = Dataset.load(char_data_dir)
    cfg = TrainConfig(batch_size=4, max_iters=1, eval_iters=3, seed=3)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=16, n_layer=1,
                          n_head=2, n_embd=16))
    seen = []
    losses = train_mod.estimate_loss(model, data, cfg, 0, lambda done, total: seen.append((done, total)))
    assert seen == [(i, 6) for i in range(1, 7)]
    assert losses == train_mod.estimate_loss(model, data, cfg, 0)  # the callback changes nothing


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_wait_healthy_reports_each_node_as_it_answers():
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health) for _ in range(3)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        nodes = [(SimpleNamespace(url=f"http://127.0.0.1:{s.server_address[1]}", name=f"n{i}",
                                  describe=lambda: "n"),
                  SimpleNamespace(poll=lambda: None, returncode=None))
                 for i, s in enumerate(servers)]
        ready = []
        wait_healthy(nodes, 10, lambda i: "", on_ready=ready.append)
        assert ready == [0, 1, 2]
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def test_serve_announces_its_url_after_startup():
    order = []

    async def app(scope, receive, send):  # a lifespan app whose startup takes a while
        assert scope["type"] == "lifespan"
        await receive()
        order.append("startup work")
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})

    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive():
        return next(messages)

    async def send(msg):
        order.append(msg["type"])

    class Recorder(logging.Handler):
        def emit(self, record):
            order.append(record.getMessage())

    handler, logger = Recorder(), logging.getLogger("mdi")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        asyncio.run(announce_when_ready(app, "at http://x:1/")({"type": "lifespan"}, receive, send))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert order == ["startup work", "lifespan.startup.complete", "at http://x:1/",
                     "lifespan.shutdown.complete"]


def test_weight_upload_counts_every_byte_it_streams():
    from mdi.ring.starter.client import _aiter

    class Bar:
        n = 0

        def update(self, k: int) -> None:
            self.n += k

    bar, chunks = Bar(), [b"abc", b"", b"defgh"]

    async def consume() -> bytes:
        return b"".join([c async for c in _aiter(iter(chunks), bar)])

    assert asyncio.run(consume()) == b"abcdefgh" and bar.n == 8
