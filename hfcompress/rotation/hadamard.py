"""Orthogonal matrices for rotating a model: randomized Hadamard, else random orthogonal.

A Hadamard matrix ``H`` (entries +-1, ``H H^T = n I``) spreads every direction evenly over all
coordinates, so ``H / sqrt(n)`` turns a vector with a few large entries (an outlier channel) into
one whose entries are all about the same size: what the group grids of a quantizer want
(QuIP's incoherence processing; QuaRot). Flipping the signs of its rows at random
(``diag(s) H``) gives a different such matrix per seed, still orthogonal.

Orders built here: powers of two (Sylvester: ``H_2n = [[H, H], [H, -H]]``), ``q + 1`` for a prime
``q = 3 mod 4`` (Paley's first construction, from the quadratic residues mod ``q``: 12, 20, 24,
44, 48, 60, 68, 72, 80, 84, ...), and products of these (the Kronecker product of Hadamard
matrices is one): SmolLM2's hidden size 576 is 4 x 12 x 12, Qwen2's 896 is 4 x 224. An order
with no such factorization (36, say) falls back to a random orthogonal matrix (the Q of a
Gaussian matrix's QR), which rotates as exactly but spreads outliers less evenly.

>>> H = hadamard(12)
>>> bool((H @ H.T == 12 * torch.eye(12)).all())
True
>>> Q = random_rotation(576, seed=0)
>>> bool(torch.allclose(Q @ Q.T, torch.eye(576, dtype=Q.dtype), atol=1e-12))
True
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley I: the Hadamard matrix of order ``q + 1`` for a prime ``q = 3 mod 4``."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.float64)
    i = torch.arange(q)
    jacobsthal = chi[(i[None, :] - i[:, None]) % q]  # Q[i, j] = chi(j - i): antisymmetric for q = 3 mod 4
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, jacobsthal
    return torch.eye(q + 1, dtype=torch.float64) + S  # I + S with S skew: (I + S)(I + S)^T = (q + 1) I


@functools.lru_cache(maxsize=None)
def _factors(n: int) -> tuple[int, ...] | None:
    """Orders whose Hadamard matrices we build and whose product is ``n`` (None: none found)."""
    if n & (n - 1) == 0:
        return (n,)
    for p in range(4, n + 1, 4):
        if n % p == 0 and _is_prime(p - 1) and (p - 1) % 4 == 3:
            rest = _factors(n // p)
            if rest is not None:
                return (p, *rest)
    return None


def has_hadamard(n: int) -> bool:
    return _factors(n) is not None


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order ``n`` (float64, entries +-1); ValueError where none is built here."""
    factors = _factors(n)
    if factors is None:
        raise ValueError(f"no Hadamard matrix of order {n} is built here (powers of two, Paley orders and their products)")
    H = torch.ones(1, 1, dtype=torch.float64)
    for p in factors:
        if p & (p - 1) == 0:
            block = torch.ones(1, 1, dtype=torch.float64)
            while block.shape[0] < p:
                block = torch.cat([torch.cat([block, block], 1), torch.cat([block, -block], 1)])
        else:
            block = _paley(p - 1)
        H = torch.kron(H, block)
    return H


def random_rotation(n: int, seed: int, method: str = "hadamard") -> torch.Tensor:
    """An ``n x n`` orthogonal matrix (float64): ``diag(s) H / sqrt(n)`` with random signs ``s``
    (``method='hadamard'``, where ``n`` allows), else the Q factor of a Gaussian matrix."""
    generator = torch.Generator().manual_seed(seed)
    if method == "hadamard" and has_hadamard(n):
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
        return signs[:, None] * hadamard(n) / n**0.5
    if method == "hadamard":
        logger.info("no Hadamard matrix of order %d is built here: rotating with a random orthogonal matrix", n)
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))  # the sign fix makes Q uniformly (Haar) distributed
