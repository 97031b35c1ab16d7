"""The engine's Link (engine/link.py) over a formed ring's data plane: messages
as frames to the first secondary (seq_frames.py, wire.py), TOKENS / SEQ_TOKENS
back from the finisher. A failure is named by the control-plane client's
diagnosis, and the run is released on the nodes that still answer."""
from __future__ import annotations

import asyncio
import logging
import time

import httpx

from ...engine.link import LinkClosed
from ...engine.messages import Decode, Message, Prefill, Prefills, Replay, Tokens
from ...engine.slots import SlotError, SlotStage
from ...results import HopStats
from ..cluster.nodes_config import NodeSpec
from ..protocol.aio import bounded
from ..protocol.local_link import link_kind
from ..protocol.seq_frames import to_frame, to_message
from ..protocol.wire import Frame, Kind, Limits, WireError, encode_frame, read_frame, write_frame
from .client import FormedRing, RingClient
from .replay_order import HeldReplay

log = logging.getLogger(__name__)


class TcpLink:
    """The engine's Link over the ring's data plane: frames to the first secondary,
    TOKENS / SEQ_TOKENS back from the finisher.

    Silence only counts while a Decode is unanswered: an idle server may wait
    for requests as long as it likes; a ring that does not answer a Decode
    within `timeout` seconds (from the Decode, or from the previous answer)
    has failed."""

    def __init__(self, client: RingClient, http: httpx.AsyncClient, limits: Limits,
                 ring: FormedRing, slots: SlotStage, timeout: float) -> None:
        self.client = client
        self.http = http
        self.limits = limits
        self.reader, self.writer, self.back = ring.reader, ring.writer, ring.back
        self.slots = slots                   # the engine's first stage: the lanes
        self.timeout = timeout
        self.outstanding = 0                 # Decodes sent and not answered
        self.progress = time.monotonic()     # last Decode out while idle, or answer in
        self.failed: LinkClosed | None = None
        self.hop = HopStats("starter", self.first.name, link=link_kind(self.writer))
        self.replay: HeldReplay | None = None  # a heal's replay, sent as slots need it

    def hold_replay(self, msgs: list[Replay]) -> None:
        """Send each slot's replay just before the slot's first frame (replay_order.py)."""
        self.replay = HeldReplay(msgs)

    @property
    def first(self) -> NodeSpec:
        return self.client.nodes.ring[1]

    async def send(self, msg: Message) -> None:
        if self.replay:
            held = self.replay.before(msg)
            if held and not self.writer.transport.is_closing():  # buffered, not waited for:
                data = [encode_frame(to_frame(m, self.limits.run_id, self.slots)) for m in held]
                transport = self.writer.transport  # the engine reads the other lanes' tokens
                # while the spare replays (a closing link: _send below raises)
                low, high = transport.get_write_buffer_limits()
                transport.set_write_buffer_limits(high=high + sum(map(len, data)), low=low)
                for d in data:
                    self.writer.write(d)
        await self._send(msg)

    async def _send(self, msg: Message) -> None:
        if self.failed is not None:
            raise self.failed
        frame = to_frame(msg, self.limits.run_id, self.slots)
        first = self.first
        try:
            data = encode_frame(frame)
            n = len(data)
            if self.writer.transport.is_closing():  # (uvloop's write would raise RuntimeError)
                raise ConnectionResetError("the link is closed")
            self.writer.write(data)
            if self.writer.transport.get_write_buffer_size():  # the socket did not take it all
                await bounded(self.writer.drain(), self.timeout)
            else:  # no wait; raises if the link is gone
                await self.writer.drain()
        except asyncio.TimeoutError:
            raise await self._failure(f"{first.name} at {first.addr}:{first.port_in} "
                                      f"took no data for {self.timeout:g} s", first) from None
        except OSError as e:
            raise await self._failure(f"the data link to {first.name} at {first.addr}:"
                                      f"{first.port_in} failed: {e or type(e).__name__}",
                                      first) from None
        if isinstance(msg, Decode):
            self.hop.decode_bytes += n
            self.hop.decode_tokens += len(msg.slots)
            if self.outstanding == 0:
                self.progress = time.monotonic()
            self.outstanding += 1
        elif isinstance(msg, (Prefill, Prefills)):
            self.hop.prefill_bytes += n

    async def recv(self) -> Tokens:
        while True:
            if self.failed is not None:
                raise self.failed
            wait = self.timeout
            if self.outstanding:
                wait = max(0.0, self.progress + self.timeout - time.monotonic())
            try:
                frame = await bounded(read_frame(self.reader, self.limits), wait)
            except asyncio.TimeoutError:
                if self.outstanding and time.monotonic() - self.progress >= self.timeout:
                    raise await self._failure(f"no answer from the ring for {self.timeout:g} s") \
                        from None
                continue
            except EOFError:
                raise await self._failure("the finisher closed its link to the starter") from None
            except (WireError, OSError) as e:
                raise await self._failure(f"bad data from the finisher: {e}") from None
            if frame.kind not in (Kind.TOKENS, Kind.SEQ_TOKENS) or not self.outstanding:
                raise await self._failure(f"unexpected {frame.kind.name} frame from the finisher")
            self.outstanding -= 1
            self.progress = time.monotonic()
            try:
                msg = to_message(frame, self.slots)
            except (WireError, SlotError) as e:
                raise await self._failure(f"bad data from the finisher: {e}") from None
            assert isinstance(msg, Tokens)
            return msg

    async def _failure(self, what: str, node: NodeSpec | None = None) -> LinkClosed:
        """Name the node behind a failure and release the run on the nodes that answer."""
        if self.failed is not None:
            return self.failed
        spec, culprit, silent = await self.client.diagnose(self.http, self.limits.run_id)
        spec = spec or node
        o = self.client.opts
        if not (o.recover and o.recovery == "replay"):  # else the survivors keep it to resume
            await self.client.release(self.http, self.limits.run_id, silent)
        self.failed = LinkClosed(f"{culprit}: {what}" if culprit else what,
                                 node=spec.describe() if spec else None)
        self.failed.spec = spec  # type: ignore[attr-defined]
        self.failed.silent = silent  # type: ignore[attr-defined]
        return self.failed

    def abandon(self) -> None:
        """Close the data links without STOP: the ring behind them failed."""
        self.writer.close()
        self.back.close()

    async def close(self) -> None:
        """STOP once around the ring; the nodes end the run and stay up."""
        try:
            if self.failed is None:
                await bounded(write_frame(self.writer, Frame(Kind.STOP, self.limits.run_id)),
                              self.timeout)
                while True:
                    f = await bounded(read_frame(self.reader, self.limits), self.timeout)
                    if f.kind == Kind.STOP:
                        break
        except (asyncio.TimeoutError, OSError, EOFError, WireError) as e:
            log.warning("the ring did not return STOP: %s", e or type(e).__name__)
            await self.client.release(self.http, self.limits.run_id)
        finally:
            self.abandon()
