"""Which kernel a QuantLinear runs on, and the one-time repack that kernel needs.

- CUDA: the Triton kernels (``hfcompress.kernels``) for 4 and 8 bits, fp16/bf16 activations, and
  groups that are multiples of 16 (a short last group is fine);
- CPU: torch's packed int4 matmul (4 bits, groups that are multiples of 32) and int8 matmul
  (8 bits, one group per row), for bfloat16 activations (load the model in bfloat16 for speed);
- anything else: the reference path (``QuantLinear.reference_forward``).

Act-order layers are permuted once so that their groups are contiguous runs of K; the forward
then permutes the activations (``x[:, perm]``) instead of gathering weights.

``HFCOMPRESS_KERNELS=reference`` (or :func:`use`) turns the kernels off, for comparisons;
``HFCOMPRESS_KERNELS=triton`` runs the Triton kernels on CPU tensors too, which is how the tests
exercise them under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .grid import group_index
from .pack import pack_rows

logger = logging.getLogger(__name__)

MODES = ("auto", "reference", "triton")
# The mode in force: set by use(), else the environment's, read when a kernel is first chosen
# (never at import: a typo must not break `import hfcompress`). A plain module attribute rather
# than a context variable: torch.compile traces the forward pass, and Dynamo reads (and guards
# on) a module attribute but cannot trace ContextVar.get.
_mode: str | None = None


def _environment_mode() -> str:
    mode = os.environ.get("HFCOMPRESS_KERNELS", "auto")
    if mode not in MODES:  # a typo in the environment must not break every command (inspect, eval ...)
        warnings.warn(f"HFCOMPRESS_KERNELS={mode[:40]!r} is not a kernel mode (valid: {', '.join(MODES)}): using auto",
                      RuntimeWarning, stacklevel=3)
        return "auto"
    return mode


def current_mode() -> str:
    global _mode
    if _mode is None:
        _mode = _environment_mode()
    return _mode


def enabled() -> bool:
    return current_mode() != "reference"


@contextmanager
def use(mode: str) -> Iterator[None]:
    """Run the block with kernel ``mode`` ("auto", "reference" or "triton"); modules repack as needed."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"kernel mode {mode!r}; valid: {', '.join(MODES)}")
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous


@dataclass
class Kernel:
    device: torch.device
    name: str  # "triton", "cpu-int4", "cpu-int8" or "reference"
    run: Callable[[torch.Tensor], torch.Tensor] | None = None  # [M, K] -> [M, N]
    dtypes: tuple[torch.dtype, ...] = ()
    perm: torch.Tensor | None = None  # act-order: x[:, perm] makes the groups contiguous
    mode: str = field(default_factory=current_mode)

    @property
    def usable(self) -> bool:
        return self.run is not None

    def accepts(self, x: torch.Tensor) -> bool:
        return x.dtype in self.dtypes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        return self.run(x)


def _natural_codes(module, weight) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Codes ``[N, K]`` of ``weight`` (``module.unpack()``) with groups as contiguous runs of K,
    and the permutation used (or None)."""
    fmt = module.format
    if module.g_idx is None or fmt.group_size == -1:
        return weight.q, None
    g_idx = weight.g_idx.long()
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], group_index(g_idx.numel(), fmt.group_size, g_idx.device).long()):
        return None  # groups of unequal sizes cannot be read as runs: stay on the reference path
    if torch.equal(perm, torch.arange(perm.numel(), device=perm.device)):
        return weight.q, None
    return weight.q[:, perm], perm


def _prepare_triton(module, device: torch.device) -> Kernel:
    fmt = module.format
    span = module.in_features if fmt.group_size == -1 else fmt.group_size
    if fmt.bits not in (4, 8) or span % 16:
        return Kernel(device, "reference")
    try:
        from ..kernels import ops  # noqa: F401  (registers torch.ops.hfcompress.quant_matmul)
    except ImportError:
        # Said once per device (the warnings filter shows a message once per place).
        warnings.warn(f"triton is not installed: packed layers run the reference path on {device} "
                      "(pip install 'hfcompress[triton]')", RuntimeWarning, stacklevel=2)
        return Kernel(device, "reference")
    natural = _natural_codes(module, module.unpack())
    if natural is None:
        return Kernel(device, "reference")
    q, perm = natural
    qweight = pack_rows(q.t(), fmt.bits).to(device) if perm is not None else module.qweight.to(device)
    scales, qzeros = module.scales.to(device), module.qzeros.to(device)
    bits = fmt.bits

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.hfcompress.quant_matmul(x, qweight, scales, qzeros, bits, span)

    return Kernel(device, "triton", run, (torch.float16, torch.bfloat16), None if perm is None else perm.to(device))


def _prepare_cpu(module, device: torch.device) -> Kernel:
    from ..kernels import cpu

    fmt = module.format
    weight = module.unpack() if fmt.bits in (4, 8) else None
    natural = _natural_codes(module, weight) if weight is not None else None
    if natural is None:
        return Kernel(device, "reference")
    q, perm = natural
    zeros = weight.zeros
    # torch's packed CPU matmuls are fast for bfloat16 activations only (float32 and float16 take
    # a slow generic path, 20-40x slower than nn.Linear), so other dtypes use the reference path.
    dtypes = (torch.bfloat16,)
    if fmt.bits == 4:
        packed4 = cpu.prepare_int4(q, module.scales, zeros, fmt.group_size)
        if packed4 is not None:
            return Kernel(device, "cpu-int4", lambda x: cpu.int4_matmul(x, packed4), dtypes, perm)
    elif perm is None:  # one group per row has no act-order permutation
        packed8 = cpu.prepare_int8(q, module.scales, zeros)
        if packed8 is not None:
            return Kernel(device, "cpu-int8", lambda x: cpu.int8_matmul(x, packed8), dtypes)
    return Kernel(device, "reference")


@torch.no_grad()
def prepare(module, device: torch.device) -> Kernel:
    """The kernel for ``module``'s inputs on ``device`` (its repacked weights included)."""
    if device.type == "cuda" or (current_mode() == "triton" and device.type == "cpu"):
        kernel = _prepare_triton(module, device)
    elif device.type == "cpu":
        kernel = _prepare_cpu(module, device)
    else:
        kernel = Kernel(device, "reference")
    logger.debug("%s: %s kernel on %s", module.extra_repr(), kernel.name, device)
    return kernel
