"""The worker actor: a thin Ray shell over one `EngineLoop` (build the engine, delegate).

A plain class, so importing it needs no Ray; `cluster/pool.py` wraps it with `ray.remote` as a
threaded actor. Ray is the control plane (ready, reset, stats, integrity, the KV handoff verbs,
liveness through `watch`); submits, aborts, deltas and load go over the actor's data plane
(`worker/dataplane.py`: a zmq socket whose address `data_plane()` gives), which runs in a process
of its own linked to the engine loop (`worker/loop_link.py`), or beside it with
KVRELAY_DATAPLANE_INPROCESS=1.

Only our own dataclasses (`worker/protocol.py`) cross its methods: the router converts what a
client sent into them, so nothing a client sent is ever unpickled here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence

from .config import EngineConfig
from .dataplane import DataPlaneServer
from .disagg.verbs import HandoffActorVerbs
from .engine import Engine, EngineStats
from .engine_loop import EngineLoop
from .loop_link import LoopLink
from .model.loader import resolve_model
from .model.presets import is_random_model
from .protocol import HandoffTarget, ModelDescription, WorkRequest

log = logging.getLogger("kvrelay")

# KVRELAY_DATAPLANE_INPROCESS=1: the data plane's I/O thread runs in the actor's process, beside the
# engine loop (as before issue 14 item 2; for comparisons). By default it has a process of its own
# (worker/loop_link.py), so its Python work never holds the engine loop's GIL.
INPROCESS_ENV = "KVRELAY_DATAPLANE_INPROCESS"


def pick_device(config: EngineConfig, rank: int) -> EngineConfig:
    """This worker's GPU: the one Ray assigned it, else (outside Ray) the rank's, round robin.

    Actors see every GPU of their node (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1, so CUDA
    IPC between them works), so `ray.get_gpu_ids()` holds physical indices, valid as `cuda:N`.
    """
    if config.device == "cpu" or config.device.startswith("cuda:"):
        return config
    import torch

    if not torch.cuda.is_available():
        if config.device == "cuda":
            raise ValueError(f"device='cuda' but worker {rank} sees no CUDA GPU")
        return dataclasses.replace(config, device="cpu")
    gpu: int | None = None
    try:
        import ray

        if ray.is_initialized():
            ids = ray.get_gpu_ids()
            gpu = int(ids[0]) if ids else None
    except ImportError:
        pass
    if gpu is None:
        gpu = rank % torch.cuda.device_count()
    torch.cuda.set_device(gpu)
    return dataclasses.replace(config, device=f"cuda:{gpu}")


class WorkerActor(HandoffActorVerbs):
    """Its disaggregation verbs (reserve, connect, ...) are `HandoffActorVerbs`' (worker/disagg/)."""

    _loop: EngineLoop

    def __init__(
        self,
        engine_config: EngineConfig,
        rank: int,
        pick_device_by_rank: bool = True,
        heartbeat_s: float = 0.1,
    ) -> None:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        config = pick_device(engine_config, rank) if pick_device_by_rank else engine_config
        self.rank = rank
        self._device = config.device
        self._incarnation = f"{config.kv_role}-{rank}-{uuid.uuid4().hex[:12]}"
        self._start_error: Exception | None = None
        self._closed = threading.Event()
        try:
            engine = Engine(config)
        except (ValueError, RuntimeError, OSError) as e:
            # Bad input (a model path, a config value) or a device that cannot hold the model: kept
            # for ready() to raise, so the operator reads one line from the router instead of
            # Ray's printout of a failed creation task, traceback and all.
            log.error("worker %d cannot start: %s: %s", rank, type(e).__name__, e)
            self._start_error = e
            return
        self._model = ModelDescription(
            model=config.model,
            vocab_size=engine.model_config.vocab_size,
            max_model_len=engine.max_model_len,
            eos_token_ids=tuple(sorted(engine.eos_token_ids)),
            block_size=config.block_size,
            kv_capacity_tokens=engine.allocator.num_blocks * engine.allocator.block_size,
            model_dir=None if is_random_model(config.model) else str(resolve_model(config.model)),
        )
        self._loop = EngineLoop(engine, name=f"kvrelay-engine-{rank}")
        self._dataplane: DataPlaneServer | LoopLink
        if os.environ.get(INPROCESS_ENV) == "1":
            self._dataplane = DataPlaneServer(
                self._loop, data_plane_host(), incarnation=self._incarnation, heartbeat_s=heartbeat_s
            )
        else:
            try:
                self._dataplane = LoopLink(
                    self._loop, data_plane_host(), incarnation=self._incarnation, heartbeat_s=heartbeat_s
                )
            except (RuntimeError, OSError) as e:  # its process did not start: ready() says why
                log.error("worker %d cannot start its data plane: %s", rank, e)
                self._loop.shutdown()
                self._start_error = e
                return
        log.info(
            "worker %d ready on %s: %d KV blocks of %d tokens; data plane at %s (%s)",
            rank,
            engine.device,
            engine.allocator.num_blocks,
            config.block_size,
            self._dataplane.address,
            "in this process" if isinstance(self._dataplane, DataPlaneServer) else "its own process",
        )

    def ready(self) -> ModelDescription:
        if self._start_error is not None:
            raise self._start_error
        return self._model

    def data_plane(self) -> tuple[str, str]:
        """(address of this incarnation's data plane, the incarnation): a router's WorkerEndpoint."""
        return self._dataplane.address, self._incarnation

    def watch(self, timeout_s: float) -> bool:
        """Liveness for the control plane: returns after timeout_s (True), or at shutdown (False).
        The pool keeps one in flight; the actor's death fails it at once."""
        return not self._closed.wait(timeout_s)

    def reserve(
        self, requests: Sequence[WorkRequest], producer: str, router_id: str | None = None
    ) -> dict[str, HandoffTarget | str]:
        """Decode worker (see HandoffActorVerbs.reserve); the deltas of the reserved requests go
        over the data plane to `router_id` (they were not SUBMITted there)."""
        ids = [r.request_id for r in requests]
        if router_id is not None:
            self._dataplane.claim(ids, router_id)
        answers = super().reserve(requests, producer)
        self._dataplane.release([rid for rid, a in answers.items() if not isinstance(a, HandoffTarget)])
        return answers

    def device_info(self) -> tuple[str, int]:
        """(this worker's device, GPUs it can see): every GPU of the node, for CUDA IPC."""
        import torch

        return self._device, torch.cuda.device_count() if torch.cuda.is_available() else 0

    def reset(self) -> None:
        self._loop.reset()
        self._dataplane.release_all()

    def stats(self) -> EngineStats:
        if isinstance(self._dataplane, DataPlaneServer):
            return self._dataplane.with_cpu(self._loop.stats())
        io_cpu_s = self._dataplane.cpu_s()
        return dataclasses.replace(
            self._loop.stats(),  # loop_cpu_s read on the loop thread
            io_cpu_s=io_cpu_s,
            process_cpu_s=time.process_time() + io_cpu_s,
        )

    def check_integrity(self) -> None:
        self._loop.check_integrity()

    def incarnation(self) -> str:
        """Unique per actor process: the key decode workers file this producer's handoffs under."""
        return self._incarnation

    def debug_stall(self, seconds: float) -> None:
        """Fault injection for tests: the engine stops stepping for `seconds`."""
        self._loop.stall(seconds)

    def shutdown(self) -> None:
        self._closed.set()
        self._loop.shutdown()  # its final ABORT deltas, then ERROR, go out before the socket closes
        if isinstance(self._dataplane, DataPlaneServer):
            time.sleep(0.05)
        self._dataplane.close()


def data_plane_host() -> str:
    """The address the data plane binds: KVRELAY_DATAPLANE_HOST, else the node IP Ray gives this
    actor (reachable from routers on other nodes), else loopback outside Ray."""
    host = os.environ.get("KVRELAY_DATAPLANE_HOST")
    if host:
        return host
    try:
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())
    except ImportError:
        pass
    return "127.0.0.1"
