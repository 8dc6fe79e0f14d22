"""Why low rank works: the paper's analyses of the learned update ΔW (Hu et al. 2021, arXiv 2106.09685, §7).

Three questions, one function (or two) each. All of them take weight matrices as arrays, not models, so they apply
to LoRA's ΔW = s·A·B (``LoRALinear.delta_weight()``), to full fine-tuning's ΔW = W_finetuned − W_base, and to
random matrices (the baselines) alike.

1. Do LoRA runs of different rank, or different seeds, learn the same directions? (§7.2, Fig. 3 and 4)
   ``subspace_similarity(X, Y)``. Take the top-i singular directions of X and the top-j of Y, and ask how much of
   the smaller of the two subspaces lies inside the other. The paper's Eq. (4):

       φ(X, Y, i, j) = ‖U_Xⁱᵀ U_Yʲ‖²_F / min(i, j)   ∈ [0, 1]

   U_Xⁱ (d, i) holds the top-i singular vectors of X as orthonormal columns. ‖U_Xⁱᵀ U_Yʲ‖²_F is the sum of the
   squared cosines of the principal angles between the two subspaces, at most min(i, j), so φ = 1 when one
   subspace contains the other and 0 when they are orthogonal. The paper finds that the top direction of A at
   r = 8 and at r = 64 overlap (φ > 0.5 for i = j = 1 on ΔW_v) while the others barely do, and reads the rest as
   noise accumulated in training; Fig. 4 finds the same between two seeds of r = 64.
   Baseline: two independent random subspaces give E[φ] = max(i, j) / d (derived in tests/test_analysis.py),
   so a heatmap is read against that floor, not against 0.

2. How does ΔW relate to the pretrained W? (§7.3, Table 7; no numbered equation, the definitions are in the
   text of §7.3 and Table 7's caption). ``amplification(delta_w, w, k)``. Project W onto ΔW's own k-dimensional
   input and output subspaces, with U, V the top-k left and right singular vectors of ΔW:

       ‖Uᵀ W V‖_F            (the paper writes ‖UᵀWVᵀ‖_F, with Vᵀ its k rows; it is the same k × k matrix)

   and compare with the same projection onto W's own top-k directions (‖Uᵀ W V‖_F = the norm of W's top-k
   singular values: W's strongest directions) and onto a random matrix's (‖Uᵀ W V‖_F ≈ k/√(d_in·d_out)·‖W‖_F:
   directions unrelated to W). The paper's amplification factor is

       ‖ΔW‖_F / ‖Uᵀ W V‖_F    with U, V from ΔW,

   how much ΔW magnifies the part of W that lies in ΔW's directions. Table 7 (GPT-3, layer 48, W_q, k = r):
       r = 4:  ‖ΔW‖_F = 6.91, ‖UᵀWV‖_F = 0.32 (ΔW), 21.67 (W), 0.02 (random); ‖W‖_F = 61.95; factor 6.91/0.32 ≈ 21.5
       r = 64: ‖ΔW‖_F = 3.57, ‖UᵀWV‖_F = 1.90 (ΔW), 37.71 (W), 0.33 (random);                  factor ≈ 1.9
   (the random column is what chance predicts: with d = 12288, 4/12288·61.95 = 0.020 and 64/12288·61.95 = 0.32,
   against the paper's 0.02 and 0.33). The reading:
   ΔW is more correlated with W than chance (0.32 ≫ 0.02), but it does not repeat W's top directions (0.32 ≪
   21.67); it amplifies directions that W has but does not emphasise, and by a large factor.

3. How low is the rank of an update that was never constrained to be low? (the "intrinsic rank" hypothesis of
   §4.1, tested on full fine-tuning's ΔW): ``singular_spectrum(delta_w)`` and ``effective_rank(delta_w)``.

Our notation is the transpose of the paper's. This project uses row vectors, y = x @ W, W (d_in, d_out), and
ΔW = A @ B with A (d_in, r), B (r, d_out). The paper uses column vectors, h = W₀x + B_p A_p x, with
A_p (r, d_in) and B_p (d_out, r) (see lora.py). So
    our A = A_pᵀ,   our B = B_pᵀ,   our ΔW = (B_p A_p)ᵀ = ΔW_paperᵀ   (d_in, d_out).
Transposing a matrix swaps its left and right singular vectors (ΔW_p = U Σ Vᵀ  ⟺  ΔWᵀ_p = V Σ Uᵀ) and keeps
its singular values. Hence in our convention the LEFT singular vectors of ΔW (and of W) live in the INPUT space
R^{d_in} and the RIGHT ones in the OUTPUT space R^{d_out}; in the paper it is the other way round. Concretely:
  - §7.2 takes the paper's A_p (r, d_in) and its RIGHT singular vectors (the input subspace). Our A (d_in, r) is
    its transpose, so the same vectors are the LEFT singular vectors of our A: ``subspace_similarity(A1, A2)``
    with our A's is exactly the paper's φ. (The paper's footnote 7 notes the same analysis works for B_p with its
    left singular vectors, the output subspace; with ours that is ``subspace_similarity(B1.T, B2.T)``.)
  - §7.3: with our U (d_in, k) and V (d_out, k), Uᵀ W V = (U_pᵀ W_p V_p)ᵀ, whose Frobenius norm is the same.
  - Singular values, hence the spectrum and the effective rank, do not change under transposition.
So every number these functions return equals the paper's; only the words "left" and "right" swap.

Everything here runs on the host in float64 (inputs go through ``backend.to_numpy``): an SVD of a few hundred
× a few hundred is instant on a CPU, and float64 keeps rounding far below the effects being measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from . import backend, checks

np = backend.np  # host NumPy: the analyses are small dense SVDs, done on the CPU whatever the training backend


def _host_matrix(x: Any, name: str) -> tuple[Any, float]:
    """``x`` as a float64 host matrix (shape and values checked), and the rounding level eps of its own dtype."""
    dtype = getattr(x, "dtype", None)
    a = np.asarray(backend.to_numpy(x), dtype=np.float64)
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"{name} must be a non-empty 2-D matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has NaN or infinite entries")
    # The rounding level of the input's own dtype: a float32 A @ B of rank r is rank r only up to float32 rounding.
    eps = np.finfo(dtype).eps if dtype is not None and np.issubdtype(dtype, np.floating) else np.finfo(np.float64).eps
    return a, float(eps)


def _numerical_rank(s: Any, shape: tuple[int, int], eps: float) -> int:
    """How many singular values stand above rounding (NumPy's matrix_rank rule: σ > σ₁·max(shape)·eps)."""
    return int((s > s[0] * max(shape) * eps).sum()) if s[0] > 0 else 0


def _top_singular_pairs(x: Any, k: int | None, name: str, arg: str) -> tuple[Any, Any]:
    """The top-k left and right singular vectors of ``x`` (d, m), from one SVD: U (d, k) and V (m, k), orthonormal
    columns; k = None means all min(d, m). Refuses k beyond the numerical rank: past it the singular values are
    rounding noise and the 'directions' are whatever LAPACK happens to return."""
    a, eps = _host_matrix(x, name)
    u, s, vt = np.linalg.svd(a, full_matrices=False)  # a = u @ diag(s) @ vt, s descending
    k = len(s) if k is None else checks.integer(k, arg, 1, len(s), why=f"(min of {name}'s shape {a.shape})")
    rank = _numerical_rank(s, a.shape, eps)
    if k > rank:
        raise ValueError(f"{arg}={k} but {name} has numerical rank {rank}: its singular directions past the rank "
                         f"are arbitrary; use {arg} <= {rank}")
    return u[:, :k], vt[:k].T


def numerical_rank(x: Any) -> int:
    """How many singular directions of ``x`` stand above the rounding of its own dtype (σ_k > σ₁·max(shape)·eps,
    NumPy's matrix_rank rule). The largest k that ``amplification`` and ``subspace_similarity`` accept: a LoRA
    ΔW of rank r briefly trained from B = 0 can have fewer than r directions above float32 rounding."""
    a, eps = _host_matrix(x, "x")
    return _numerical_rank(np.linalg.svd(a, compute_uv=False), a.shape, eps)


# ---------------------------------------------------------------------------------------------------------------
# §7.2: subspace similarity
# ---------------------------------------------------------------------------------------------------------------


def subspace_similarity(X: Any, Y: Any, max_i: int | None = None, max_j: int | None = None) -> Any:
    """The paper's normalised subspace similarity (Hu et al. §7.2, Eq. 4) for every pair (i, j):

        phi[i-1, j-1] = ‖U_Xⁱᵀ U_Yʲ‖²_F / min(i, j),   1 <= i <= max_i,  1 <= j <= max_j

    X (d, m) and Y (d, n) live in the same space R^d (e.g. two LoRA A's of one layer, (d_in, r₁) and
    (d_in, r₂)); U_Xⁱ are the top-i LEFT singular vectors of X. ``max_i`` defaults to min(d, m), ``max_j`` to
    min(d, n). Returns a float64 array (max_i, max_j) with entries in [0, 1].

    φ depends on X only through its singular vectors and their order: X @ Q (Q orthogonal) and c·X give the
    same φ (c ≠ 0). Any invertible X @ R keeps the column space, so the full-span row i = rank(X) stays the same,
    but it can reorder the directions inside, so the other rows can change.
    """
    ux, _ = _top_singular_pairs(X, max_i, "X", "max_i")  # (d, max_i)
    uy, _ = _top_singular_pairs(Y, max_j, "Y", "max_j")  # (d, max_j)
    max_i, max_j = ux.shape[1], uy.shape[1]
    if ux.shape[0] != uy.shape[0]:
        raise ValueError(f"X and Y must live in the same space (same number of rows), got {ux.shape[0]} and "
                         f"{uy.shape[0]}; for LoRA's B (r, d_out) pass B.T")
    g2 = (ux.T @ uy) ** 2  # (max_i, max_j): squared cosines between single directions
    overlap = g2.cumsum(axis=0).cumsum(axis=1)  # overlap[i-1, j-1] = ‖U_Xⁱᵀ U_Yʲ‖²_F: a sum over the top-left block
    i = np.arange(1, max_i + 1)[:, None]  # (max_i, 1)
    j = np.arange(1, max_j + 1)[None, :]  # (1, max_j)
    return overlap / np.minimum(i, j)  # (max_i, max_j)


# ---------------------------------------------------------------------------------------------------------------
# §7.3: how ΔW relates to W
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Amplification:
    """The numbers of one column group of the paper's Table 7 (Hu et al. §7.3), for one layer and one k."""

    k: int  # how many singular directions (the paper uses k = r, LoRA's rank)
    delta_w_norm: float  # ‖ΔW‖_F
    w_norm: float  # ‖W‖_F
    w_on_delta_w: float  # ‖Uᵀ W V‖_F, U, V = ΔW's top-k left/right singular vectors (Table 7's "ΔW_q" column)
    w_on_w: float  # ‖Uᵀ W V‖_F, U, V = W's own top-k (= √(σ₁² + … + σ_k²) of W; Table 7's "W_q" column)
    w_on_random: float  # ‖Uᵀ W V‖_F, U, V = a random Gaussian matrix's top-k (Table 7's "Random" column)

    @property
    def factor(self) -> float:
        """The amplification factor ‖ΔW‖_F / ‖Uᵀ W V‖_F with U, V from ΔW (§7.3: 6.91/0.32 ≈ 21.5 at r = 4).
        Infinite when W has no component at all in ΔW's directions."""
        return self.delta_w_norm / self.w_on_delta_w if self.w_on_delta_w > 0 else float("inf")

    @property
    def delta_w_over_w(self) -> float:
        """‖ΔW‖_F / ‖W‖_F: how large the update is next to the weight (Table 7: 6.91/61.95 ≈ 0.11 at r = 4). The
        factor divides by W's part in ΔW's directions, so an update as large as W has a large factor whatever its
        directions: read the factor next to this ratio."""
        return self.delta_w_norm / self.w_norm if self.w_norm > 0 else float("inf")

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "factor": self.factor, "delta_w_over_w": self.delta_w_over_w}


def amplification(delta_w: Any, w: Any, k: int, seed: int = 0) -> Amplification:
    """Table 7 of Hu et al. (§7.3) for one layer: W projected onto the top-k singular directions of ΔW, of W
    itself and of a random matrix, and the amplification factor ‖ΔW‖_F / ‖Uᵀ W V‖_F.

    ``delta_w`` and ``w`` are (d_in, d_out) in our row-vector convention (ΔW = s·A·B, the update that is added to
    W, scaling included: ``LoRALinear.delta_weight()``; W = the pretrained weight). U (d_in, k) are the top-k left
    singular vectors (input side), V (d_out, k) the top-k right ones (output side), and Uᵀ W V is (k, k). The
    paper's column-vector U_pᵀ W_p V_p is its transpose: same norm (see the module docstring). The random matrix
    is a standard Gaussian of W's shape drawn with ``seed``; its singular vectors are uniformly random k-frames,
    independent of W, so its ‖Uᵀ W V‖_F² has expectation k²/(d_in·d_out)·‖W‖²_F (derived in the tests).

    k must not exceed ΔW's numerical rank (a rank-r LoRA update has only r meaningful directions).
    """
    dw, _ = _host_matrix(delta_w, "delta_w")
    w64, _ = _host_matrix(w, "w")
    if dw.shape != w64.shape:
        raise ValueError(f"delta_w and w must have the same shape (d_in, d_out), got {dw.shape} and {w64.shape}")
    random = backend.rng(seed).standard_normal(w64.shape)  # (d_in, d_out)

    def w_on(m: Any, name: str) -> float:
        u, v = _top_singular_pairs(m, k, name, "k")  # (d_in, k) input side, (d_out, k) output side
        return float(np.linalg.norm(u.T @ w64 @ v))  # (k, d_in) @ (d_in, d_out) @ (d_out, k) -> (k, k)

    # delta_w itself (not its float64 copy) so that the rank check uses the rounding level of ΔW's own dtype
    return Amplification(k=int(k), delta_w_norm=float(np.linalg.norm(dw)), w_norm=float(np.linalg.norm(w64)),
                         w_on_delta_w=w_on(delta_w, "delta_w"), w_on_w=w_on(w, "w"),
                         w_on_random=w_on(random, "random"))


# ---------------------------------------------------------------------------------------------------------------
# The spectrum of an update
# ---------------------------------------------------------------------------------------------------------------


def singular_spectrum(delta_w: Any) -> Any:
    """The singular values of ``delta_w`` divided by its Frobenius norm, largest first: σ_k / ‖ΔW‖_F, an array
    of length min(d_in, d_out) whose squares sum to 1. The k-th squared value is the share of ΔW's energy
    (‖ΔW‖²_F = Σ σ²) along its k-th direction, so updates of different layers and sizes share one scale. A zero
    matrix has no direction that holds energy: its spectrum is all zeros."""
    a, _ = _host_matrix(delta_w, "delta_w")
    s = np.linalg.svd(a, compute_uv=False)  # (min(d_in, d_out),), descending
    norm = float(np.sqrt((s**2).sum()))
    return s / norm if norm > 0 else s


def effective_rank(delta_w: Any, energy: float = 0.9) -> int:
    """The smallest k whose top-k squared singular values hold at least ``energy`` of ‖ΔW‖²_F: by Eckart–Young,
    the smallest rank of a matrix within √(1 − energy)·‖ΔW‖_F of ΔW. 0 for a zero matrix."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    share = np.cumsum(singular_spectrum(delta_w) ** 2)  # share[k-1] = energy held by the top k directions
    if share[-1] == 0:
        return 0
    # A 1e-12 slack: an update holding exactly 90% in its top k would otherwise miss by rounding (0.8999999999).
    return int(np.searchsorted(share, energy - 1e-12) + 1)
