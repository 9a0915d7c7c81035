"""The training engine seam: every training stage runs its step through an :class:`Engine`.

A stage builds its model (and loss, when the loss has parameters) as one module, then::

    engine = build_engine(model, cfg["engine"], lr=..., weight_decay=..., batch_size=B,
                          steps_per_epoch=S, epochs=E, schedule=warmup_cosine(...), device=dev)
    out = engine(images, ...)   # the module's forward (autocast when precision asks for it)
    engine.step(loss)           # backward; at an accumulation boundary clip, step, schedule
    engine.state_dict()         # the whole model's weights, consolidated (collective: ZeRO-3)
    engine.save(d) / engine.load(d)   # full training state (model, optimiser, scheduler)

``engine.kind`` (:class:`tskd.config.EngineConfig`) picks the implementation:

- ``torch`` (:class:`TorchEngine`): the module, wrapped in ``DistributedDataParallel`` when the
  process group has more than one rank; a torch optimiser and LR scheduler; gradient accumulation
  with ``no_sync``; ``torch.autocast`` (+ ``GradScaler`` for fp16).
- ``deepspeed`` (:class:`DeepSpeedEngine`): ``deepspeed.initialize`` with the config
  :func:`deepspeed_config` derives (ZeRO 0-3, offload, accumulation, clipping,
  ``torch_autocast``, ``raw`` merged last). It joins the process group Ray Train set up
  (``deepspeed.init_distributed`` reuses it; gloo on CPU, NCCL on GPU).
- ``auto`` (distillation's default): ``deepspeed`` on a CUDA device, ``torch`` on CPU.

A frozen module (the distillation teacher's ``sharded`` placement) is partitioned across the
workers for inference by :class:`ShardedModule` (ZeRO-3, no optimiser).

Stages contain no engine-specific code; this module is the only one that imports DeepSpeed (lazily).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from tskd.models.sam import ValueFn

log = logging.getLogger(__name__)

Schedule = Callable[[torch.optim.Optimizer, float, int], Any]
"""``schedule(optimizer, updates_per_epoch, total_updates) -> LR scheduler`` (stepped once per
optimiser update; with gradient accumulation an update is ``gradient_accumulation`` steps)."""

TORCH_STATE = "engine.pt"
DEEPSPEED_DIR = "deepspeed"
_DS_TAG = "state"
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


DS_BUCKET = int(5e8)
"""DeepSpeed's default ZeRO bucket size (elements), tuned for large models on GPUs."""


KEEP_TORCH_LINEAR = {"memory_efficient_linear": False}
"""ZeRO-3's default replaces ``torch.nn.functional.linear`` for the whole process and never puts
it back ("This will persist unless manually reset"): every model built later in that Ray worker
or driver (the next stage's student, an evaluation, a reference) would run DeepSpeed's linear,
whose bias gradient sums in another order than torch's (a hand-written reference loop stopped
matching in CI). torch's linear works under ZeRO-3: the parameters are gathered for backward."""


def deepspeed_config(engine: dict[str, Any], batch_size: int,
                     numel: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict of an ``EngineConfig`` (as a dict) for micro-batch ``batch_size``.

    The optimiser is built by :func:`build_engine` and handed to DeepSpeed (so ``optimizer`` is
    not in the config); ``raw`` is merged last (``tskd.config.EngineConfig.validate`` refuses raw
    keys the typed fields derive). ``numel``: the trainable parameters' element count; ZeRO's
    reduce and all-gather buckets are then capped at it (a bucket larger than the model buys
    nothing, and ZeRO-2 allocates two such buffers every step: on CPU, DeepSpeed's default of
    5e8 fp32 elements made each step 2.5× slower than DDP inside Ray Train workers,
    benchmarks/README.md).
    """
    zero: dict[str, Any] = {"stage": int(engine["zero_stage"]), **KEEP_TORCH_LINEAR}
    if numel is not None and numel < DS_BUCKET:
        # rounded up to a multiple of 1024 (ZeRO wants multiples of its alignment factor)
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = -(-max(1, int(numel))
                                                                      // 1024) * 1024
    if engine["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu"}
    if engine["offload_params"]:
        zero["offload_param"] = {"device": "cpu"}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(batch_size),
        "gradient_accumulation_steps": int(engine["gradient_accumulation"]),
        "gradient_clipping": float(engine["clip_grad_norm"]),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW under ZeRO
        "steps_per_print": 2**31 - 1,  # tskd logs per epoch itself
        "wall_clock_breakdown": False,
    }
    if engine["precision"] != "fp32":
        out["torch_autocast"] = {"enabled": True,
                                 "dtype": "bfloat16" if engine["precision"] == "bf16"
                                 else "float16"}
    return _merge(out, engine.get("raw") or {})


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_optimizer(params: list[torch.nn.Parameter] | list[dict[str, Any]],
                    engine: dict[str, Any], *, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """``engine.optimizer``: torch AdamW, DeepSpeedCPUAdam (AdamW mode) or fused CUDA AdamW,
    over parameters or parameter groups (a group's own ``weight_decay`` wins)."""
    name = engine["optimizer"]
    if name == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, betas=betas,
                                adamw_mode=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas,
                             fused=True if name == "fused_adam" else None)


def build_engine(model: torch.nn.Module, engine: dict[str, Any], *, lr: float,
                 weight_decay: float, batch_size: int, steps_per_epoch: int, epochs: int,
                 device: torch.device, schedule: Schedule | None = None,
                 find_unused_parameters: bool = False,
                 param_groups: list[dict[str, Any]] | None = None,
                 betas: tuple[float, float] = (0.9, 0.999)) -> "Engine":
    """Wrap ``model`` (its trainable parameters are optimised) in the configured engine.

    Args:
        engine: an ``EngineConfig`` as a dict (``tskd.config.to_dict``).
        batch_size: the micro-batch per worker.
        steps_per_epoch: micro-batches per epoch per worker (sets the schedule's length).
        schedule: builds the LR scheduler from the optimiser (``None``: constant LR).
        find_unused_parameters: DDP's flag (a term of zero weight leaves parameters unused).
        param_groups: optimiser groups of ``model``'s trainable parameters (e.g. no weight decay
            on biases and norms); default one group of all of them.
        betas: AdamW's betas.
    """
    model = model.to(device)
    params = param_groups or [p for p in model.parameters() if p.requires_grad]
    gas = int(engine["gradient_accumulation"])
    per_epoch = steps_per_epoch / gas
    total = max(1, math.floor(steps_per_epoch * epochs / gas))

    def make_scheduler(opt: torch.optim.Optimizer) -> Any:
        if schedule is None:
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        return schedule(opt, per_epoch, total)

    kind = engine["kind"]
    if kind == "auto":  # EngineConfig.resolved_kind: DeepSpeed on GPU workers, DDP on CPU
        kind = "deepspeed" if device.type == "cuda" else "torch"
    if kind == "deepspeed":
        return DeepSpeedEngine(model, engine, params=params, lr=lr, weight_decay=weight_decay,
                               batch_size=batch_size, make_scheduler=make_scheduler,
                               betas=betas)
    if kind != "torch":
        raise ValueError(f"engine.kind: invalid value {kind!r}; allowed: auto, torch, "
                         "deepspeed")
    optimizer = build_optimizer(params, engine, lr=lr, weight_decay=weight_decay, betas=betas)
    return TorchEngine(model, engine, optimizer, make_scheduler(optimizer), device,
                       find_unused_parameters=find_unused_parameters)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Engine:
    """What stages use: call it like the module, ``step(loss)``, ``state_dict()``,
    ``save(dir)``/``load(dir)``, ``train()``/``eval()``, ``module``, ``lr``."""

    kind = ""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def step(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    @property
    def module(self) -> torch.nn.Module:
        """The plain module (under ZeRO-3 its parameters are partitioned: call it on every
        rank, DeepSpeed gathers them in its forward)."""
        raise NotImplementedError

    @property
    def lr(self) -> float:
        raise NotImplementedError

    def gathered(self) -> contextlib.AbstractContextManager:
        """A context in which ``module``'s parameters are whole on every rank (collective under
        ZeRO-3; a no-op otherwise)."""
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole module's ``state_dict`` on CPU, consolidated (collective under ZeRO-3:
        every rank must call it)."""
        with self.gathered():
            return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def save(self, directory: Path) -> None:
        """Write the training state (collective: every rank calls it with its own directory;
        the union of the ranks' files is the checkpoint)."""
        raise NotImplementedError

    def load(self, directory: Path) -> None:
        """Restore what :meth:`save` wrote (the union of every rank's files)."""
        raise NotImplementedError

    def train(self) -> "Engine":
        self.module.train()
        return self

    def eval(self) -> "Engine":
        self.module.eval()
        return self


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` without frozen parameters (buffers kept): what training changes."""
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()
            if k not in frozen}


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`trainable_state` back; every key it lacks must be a frozen parameter."""
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    missing, unexpected = module.load_state_dict(state, strict=False)
    bad = [k for k in missing if k not in frozen] + list(unexpected)
    if bad:
        raise RuntimeError(f"checkpoint does not fit the model: {bad[:5]}")


class TorchEngine(Engine):
    """Plain PyTorch: DDP over the process group (more than one rank), AdamW, autocast."""

    kind = "torch"

    def __init__(self, model: torch.nn.Module, engine: dict[str, Any],
                 optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device, *,
                 find_unused_parameters: bool = False) -> None:
        self._module = model
        self.wrapped: torch.nn.Module = model
        if _world() > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device] if device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=find_unused_parameters)
        self.optimizer, self.scheduler, self.device = optimizer, scheduler, device
        self.gas = int(engine["gradient_accumulation"])
        self.clip = float(engine["clip_grad_norm"])
        self.dtype = _AUTOCAST.get(engine["precision"])
        self.scaler = (torch.amp.GradScaler(device.type) if engine["precision"] == "fp16"
                       else None)
        self.micro = 0
        self._params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sync = (self.micro + 1) % self.gas == 0 or not hasattr(self.wrapped, "no_sync")
        context = contextlib.nullcontext() if sync else self.wrapped.no_sync()
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype
                    else contextlib.nullcontext())
        with context, autocast:
            return self.wrapped(*args, **kwargs)

    def step(self, loss: torch.Tensor) -> None:
        self.micro += 1
        scaled = loss / self.gas
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        if self.micro % self.gas:
            return
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, directory: Path) -> None:
        if _rank() != 0:  # DDP keeps every rank's copy equal
            return
        state = {"model": trainable_state(self._module), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "micro": self.micro,
                 "scaler": self.scaler.state_dict() if self.scaler else None}
        torch.save(state, Path(directory) / TORCH_STATE)

    def load(self, directory: Path) -> None:
        state = torch.load(Path(directory) / TORCH_STATE, map_location=self.device,
                           weights_only=False)
        load_trainable_state(self._module, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro = int(state["micro"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])


def _numel(params: list[torch.nn.Parameter] | list[dict[str, Any]]) -> int:
    """Elements of a parameter list or of parameter groups."""
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    return sum(t.numel() for t in tensors)


class DeepSpeedEngine(Engine):
    """A DeepSpeed engine (ZeRO 0-3) on the process group Ray Train (or a test) set up."""

    kind = "deepspeed"

    def __init__(self, model: torch.nn.Module, engine: dict[str, Any], *,
                 params: list[torch.nn.Parameter] | list[dict[str, Any]], lr: float,
                 weight_decay: float, batch_size: int,
                 make_scheduler: Callable[[torch.optim.Optimizer], Any],
                 betas: tuple[float, float] = (0.9, 0.999)) -> None:
        import deepspeed
        import torch.distributed as dist

        backend = dist.get_backend() if dist.is_initialized() else None
        deepspeed.init_distributed(dist_backend=backend or "gloo")
        self.zero_stage = int(engine["zero_stage"])
        optimizer = build_optimizer(params, engine, lr=lr, weight_decay=weight_decay,
                                    betas=betas)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=make_scheduler,
            config=deepspeed_config(engine, batch_size, numel=_numel(params)))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()  # steps the optimiser and scheduler at accumulation boundaries only

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def gathered(self) -> contextlib.AbstractContextManager:
        if self.zero_stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()),
                                                 modifier_rank=None)

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(Path(directory) / DEEPSPEED_DIR), tag=_DS_TAG,
                                    exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(Path(directory) / DEEPSPEED_DIR), tag=_DS_TAG,
                                              load_module_strict=False)
        if path is None:
            raise RuntimeError(f"{directory}: no DeepSpeed checkpoint to resume from")


def held_param_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters this process holds now: every parameter's data, plus,
    under ZeRO-3, this rank's partition (``ds_tensor``) of each (a partitioned parameter's data
    is empty except while it is gathered)."""
    total = 0
    for p in module.parameters():
        part = getattr(p, "ds_tensor", None)
        total += (p.data.numel() + (part.numel() if part is not None else 0)) * p.element_size()
    return total


@contextlib.contextmanager
def peak_param_bytes(module: torch.nn.Module):
    """Track the most parameter bytes ``module`` held at the start of any sub-module's forward
    inside the block (ZeRO-3 has gathered that sub-module's parameters by then: its hooks run
    first). Yields a one-element list holding the peak so far.

    ``with peak_param_bytes(teacher) as peak: teacher(images)`` → ``peak[0]`` bytes."""
    peak = [held_param_bytes(module)]

    def sample(_module: torch.nn.Module, _inputs: Any) -> None:
        peak[0] = max(peak[0], held_param_bytes(module))

    handles = [m.register_forward_pre_hook(sample) for m in module.modules()]
    try:
        yield peak
    finally:
        for handle in handles:
            handle.remove()


class ShardedModule:
    """A frozen module partitioned across the process group with ZeRO-3, for inference only.

    Each rank keeps ``1/world`` of every parameter with at least ``persist_below`` elements
    (smaller ones stay whole on every rank: gathering them costs more than they weigh); a
    sub-module's parameters are gathered when its forward starts and released after it, also
    those a parent reads directly (SAM's decoder reads its token embeddings' ``weight``:
    DeepSpeed registers them as external parameters on first use). ``prefetch_numel``: elements
    fetched ahead of the running layer (DeepSpeed's ``stage3_prefetch_bucket_size``; 0 gathers
    each layer when it runs — least memory).

    Collective: every rank must call it the same number of times (the same batches per epoch
    as the student's DDP/ZeRO step already requires). Built from a whole module, every rank must
    hold the same weights; :meth:`build` makes it partitioned from the start instead, so that no
    rank ever holds the whole module. Attributes the wrapper lacks are read from the wrapped
    module.
    """

    def __init__(self, module: torch.nn.Module, *, batch_size: int, device: torch.device,
                 persist_below: int = 100_000, prefetch_numel: int = 0) -> None:
        import deepspeed

        _join_process_group(device)
        module.requires_grad_(False)
        config = _zero3_inference_config(batch_size, persist_below, prefetch_numel)
        self.engine, *_ = deepspeed.initialize(model=module, config=config)
        self.engine.eval()

    @classmethod
    def build(cls, make: Callable[[Callable[[], contextlib.AbstractContextManager]],
                                  torch.nn.Module],
              plan_of: Callable[[torch.nn.Module], dict[str, ValueFn]], *, batch_size: int,
              device: torch.device, persist_below: int = 100_000,
              prefetch_numel: int = 0) -> "ShardedModule":
        """A module that is partitioned from its construction on, never whole on any rank.

        ``make(partitioned)`` builds it, creating its parameter-holding parts inside
        ``partitioned()`` (``deepspeed.zero.Init``: each parameter is partitioned as it is
        made, its fresh value taken from rank 0). ``plan_of(module)`` gives every state-dict
        key's value; they are written one sub-module at a time (:func:`load_partitioned`).
        Collective; only rank 0 reads the plan's parameter values.
        """
        import deepspeed

        _join_process_group(device)
        config = _zero3_inference_config(batch_size, persist_below, prefetch_numel)
        # KEEP_TORCH_LINEAR in the config: zero.Init takes it from there, not from its argument
        partitioned = functools.partial(deepspeed.zero.Init, config_dict_or_path=config)
        module = make(partitioned)
        load_partitioned(module, plan_of(module))
        release_freed_memory()
        return cls(module, batch_size=batch_size, device=device, persist_below=persist_below,
                   prefetch_numel=prefetch_numel)

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped module, its parameters partitioned (call :meth:`__call__`, not it)."""
        return self.engine.module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.engine(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "engine":  # not set yet (a failed __init__): no recursion
            raise AttributeError(name)
        return getattr(self.engine.module, name)


def _join_process_group(device: torch.device) -> None:
    """DeepSpeed on the process group Ray Train set up (gloo when there is none yet)."""
    import deepspeed
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_initialized() else None
    deepspeed.init_distributed(dist_backend=backend or "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _zero3_inference_config(batch_size: int, persist_below: int,
                            prefetch_numel: int) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": int(batch_size),
            "zero_optimization": {"stage": 3, **KEEP_TORCH_LINEAR,
                                  "stage3_param_persistence_threshold": int(persist_below),
                                  "stage3_prefetch_bucket_size": int(prefetch_numel)},
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


@torch.no_grad()
def load_partitioned(module: torch.nn.Module, plan: dict[str, ValueFn]) -> None:
    """Write ``plan`` (``key -> value(fresh value)`` for every key of ``module.state_dict()``)
    into a module whose parameters are ZeRO-3-partitioned, one sub-module at a time.

    A sub-module's own parameters are gathered (the only moment any of it is whole), rank 0
    writes their values, and leaving the gather broadcasts them and partitions them again.
    Buffers are not partitioned: every rank writes its own. Collective. Raises ``ValueError``
    naming the key for a key the plan lacks or a value of another shape.
    """
    import deepspeed
    import torch.distributed as dist

    missing = sorted(set(module.state_dict()) - set(plan))
    if missing:
        raise ValueError(f"no value for {len(missing)} weights of the partitioned module, e.g. "
                         + ", ".join(missing[:3]))
    writer = dist.get_rank() == 0

    def write(key: str, tensor: torch.Tensor) -> None:
        value = plan[key](tensor)
        if value.shape != tensor.shape:
            raise ValueError(f"{key}: value of shape {tuple(value.shape)} for a weight of shape "
                             f"{tuple(tensor.shape)}")
        tensor.copy_(value)

    for prefix, sub in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        params = list(sub.named_parameters(recurse=False))
        if params:
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
                if writer:
                    for name, p in params:
                        write(dot + name, p.data)
            if sum(full_numel(p) for _, p in params) >= _TRIM_NUMEL:
                release_freed_memory()  # the gathered layer's buffers, back to the system
        for name, buffer in sub.named_buffers(recurse=False):
            if dot + name in plan:  # persistent buffers; the others come from the constructor
                write(dot + name, buffer)


_TRIM_NUMEL = 2**20
"""Elements gathered at once above which :func:`load_partitioned` hands freed memory back."""


def full_numel(p: torch.Tensor) -> int:
    """Elements of ``p``, also when it is a partitioned ZeRO-3 parameter."""
    return int(getattr(p, "ds_numel", p.numel()))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    return trim


def release_freed_memory() -> None:
    """Hand memory the process freed back to the system (glibc's ``malloc_trim``; a no-op
    elsewhere). Building a partitioned module frees a whole layer at a time; glibc keeps such
    blocks for reuse (its mmap threshold rises after the first large free), so without this a
    worker's resident memory stays near what the whole layers took, not what it holds."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
