"""The Fastfood transform: a structured random projection from a small vector z (d entries) to a
huge one (D entries, every parameter of a model), in O(D log D) time and O(D) memory, without
ever storing the D x d matrix. Used by the subspace method (intrinsic dimension, Li et al. 2018;
Aghajanyan et al. 2020).

    P z = first_D( concat_i  s_i H G_i Pi_i H B_i pad_m(z) ),
    s_i = sqrt(m / D) / sqrt(m sum(G_i^2))

over chunks i of m = 2^k outputs, with H the m x m Walsh-Hadamard matrix, B_i a random +-1
diagonal, Pi_i a random permutation and G_i a Gaussian diagonal. The scaling makes every column
of P about unit length, so |P z| ~ |z| whatever d and D are. The backward pass applies
P^T = sum_i s_i B_i H Pi_i^T G_i H (Hadamard is symmetric), so autograd keeps nothing of the
forward's n-sized intermediates.
"""
from __future__ import annotations

import math

import torch

# Hadamard factors applied per matmul pass: 2^6 = 64 x 64 matrices. Measured on 2 cores, 2^24
# entries: 6 bits 0.25 s, 4 bits 0.70 s, 8 bits 0.39 s, 12 bits 3.6 s (memory passes vs flops).
_RADIX_BITS = 6


def _hadamard_matrix(bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=dtype, device=device)
    for _ in range(bits):
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def hadamard_transform(vectors: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform (Sylvester order) along the last dimension, whose
    length must be 2^k; leading dimensions are a batch.

    H_{2^k} is the Kronecker product of k copies of H_2, so it is applied as a few small
    Hadamard matrices, each on its own group of index bits."""
    length = vectors.shape[-1]
    bits_total = length.bit_length() - 1
    if length != 1 << bits_total:
        raise ValueError(f"hadamard_transform needs a power-of-two length, got {length}")
    result, done = vectors, 0
    while done < bits_total:
        step = min(_RADIX_BITS, bits_total - done)
        factor = _hadamard_matrix(step, vectors.dtype, vectors.device)
        size, right = 1 << step, 1 << done
        if right == 1:
            result = result.reshape(-1, size) @ factor
        else:
            result = torch.matmul(factor, result.reshape(-1, size, right))
        done += step
    return result.reshape(vectors.shape)


class FastfoodProjection:
    """P (D x d) as random diagonals and permutations, regenerated from `seed` alone.

    The D outputs are made in chunks of m = 2^20 entries (or the next power of two >= d), each
    chunk its own Fastfood transform of z with its own B, Pi and G: the permutation then stays
    within a few MB (cache-friendly gathers) and only the last chunk is padded. Measured on 2
    busy cores, D = 10.7M, d = 1000: forward + backward 0.68 s with 2^20 chunks, 1.21 s as one
    2^24 transform."""

    def __init__(self, output_size: int, input_size: int, seed: int,
                 device: torch.device | str = "cpu", chunk_size: int = 1 << 20):
        if input_size < 1 or output_size < 1:
            raise ValueError("FastfoodProjection needs positive sizes")
        if input_size > output_size:
            raise ValueError(f"FastfoodProjection maps {input_size} numbers to {output_size}: "
                             "the input must not be larger than the output")
        self.output_size, self.input_size, self.seed = output_size, input_size, seed
        smallest = 1 << max(math.ceil(math.log2(max(input_size, 2))), 1)
        self.chunk = max(min(chunk_size, 1 << math.ceil(math.log2(output_size))), smallest)
        self.chunks = math.ceil(output_size / self.chunk)
        # z occupies the first `head` = 2^ceil(log2 d) entries of each padded chunk, so only
        # those signs of B_i are ever used.
        self.head = min(smallest, self.chunk)
        generator = torch.Generator().manual_seed(seed)
        shape = (self.chunks, self.chunk)
        self.signs = (torch.randint(0, 2, (self.chunks, self.head), generator=generator) * 2
                      - 1).float().to(device)
        self.permutation = torch.stack([torch.randperm(self.chunk, generator=generator)
                                        for _ in range(self.chunks)]).to(device)
        self.inverse_permutation = torch.argsort(self.permutation, dim=1)
        self.gaussian = torch.randn(shape, generator=generator).to(device)
        # Each chunk's columns get length sqrt(chunk / D), so a whole column has length ~1.
        self.scales = (math.sqrt(self.chunk / output_size)
                       / (self.chunk * self.gaussian.pow(2).sum(dim=1)).sqrt()).unsqueeze(1)

    # H_m = H_{m/h} (x) H_h, and the padded input is zero past its first h entries, so the first
    # Hadamard transform is H_h of those h entries tiled m/h times (and, in the transpose, the
    # last one is H_h of the sum of the m/h blocks): one full m-point transform per direction.
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        head = torch.zeros(self.chunks, self.head, dtype=z.dtype, device=z.device)
        head[:, : self.input_size] = z
        mixed = hadamard_transform(head * self.signs).repeat(1, self.chunk // self.head)
        mixed = hadamard_transform(mixed.gather(1, self.permutation) * self.gaussian)
        return (mixed * self.scales).reshape(-1)[: self.output_size]

    def transpose(self, vector: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros(self.chunks * self.chunk, dtype=vector.dtype, device=vector.device)
        padded[: self.output_size] = vector
        mixed = hadamard_transform(padded.reshape(self.chunks, self.chunk) * self.scales)
        mixed = (mixed * self.gaussian).gather(1, self.inverse_permutation)
        folded = mixed.reshape(self.chunks, self.chunk // self.head, self.head).sum(dim=1)
        return (hadamard_transform(folded) * self.signs)[:, : self.input_size].sum(dim=0)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return _ProjectFunction.apply(z, self)


class _ProjectFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, projection: FastfoodProjection) -> torch.Tensor:
        ctx.projection = projection
        return projection.forward(z)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return ctx.projection.transpose(grad_output), None
