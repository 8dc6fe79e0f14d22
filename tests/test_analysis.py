"""Tests for lora_np/analysis.py: the paper's subspace similarity φ (§7.2, Eq. 4), the amplification of W by ΔW
(§7.3, Table 7) and the spectrum / effective rank of an update, each against exact constructions and against
expectations derived here for random matrices."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_np.analysis import amplification, effective_rank, numerical_rank, singular_spectrum, subspace_similarity


def gaussian(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def orthogonal(d: int, seed: int = 0) -> np.ndarray:
    """A random d x d orthogonal matrix (QR of a Gaussian)."""
    q, _ = np.linalg.qr(gaussian(d, d, seed=seed))
    return q


def with_spectrum(s: list[float], d_in: int, d_out: int, seed: int = 0) -> np.ndarray:
    """A (d_in, d_out) matrix whose singular values are exactly ``s`` (padded with zeros), random directions."""
    u, v = orthogonal(d_in, seed)[:, : len(s)], orthogonal(d_out, seed + 1)[:, : len(s)]
    return u @ np.diag(s) @ v.T


def mean_and_standard_error(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over axis 0 and its standard error (sample std / √n). A mean more than 5 standard errors from the
    true expectation happens with probability < 1e-6 for a sample this large (CLT), so a 5-SE band is a test
    that fails on a wrong formula and practically never by chance."""
    return samples.mean(axis=0), samples.std(axis=0, ddof=1) / np.sqrt(len(samples))


shapes = st.integers(1, 10)
seeds = st.integers(0, 2**31 - 1)


# --- φ: the definition, its range, its extremes -----------------------------------------------------------------


def phi_by_definition(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Eq. (4) entry by entry, a fresh SVD per entry: the slow reference for the cumulative-sum implementation."""
    ux, uy = np.linalg.svd(X, full_matrices=False)[0], np.linalg.svd(Y, full_matrices=False)[0]
    out = np.empty((ux.shape[1], uy.shape[1]))
    for i in range(1, ux.shape[1] + 1):
        for j in range(1, uy.shape[1] + 1):
            out[i - 1, j - 1] = np.linalg.norm(ux[:, :i].T @ uy[:, :j]) ** 2 / min(i, j)
    return out


@settings(max_examples=60, deadline=None)
@given(d=shapes, m=shapes, n=shapes, seed=seeds)
def test_phi_matches_the_definition_and_lies_in_0_1(d, m, n, seed):
    X, Y = gaussian(d, m, seed=seed), gaussian(d, n, seed=seed + 1)
    phi = subspace_similarity(X, Y)
    assert phi.shape == (min(d, m), min(d, n))
    assert np.allclose(phi, phi_by_definition(X, Y), atol=1e-12)
    assert (phi >= -1e-12).all() and (phi <= 1 + 1e-12).all()


@settings(max_examples=40, deadline=None)
@given(d=shapes, m=shapes, seed=seeds)
def test_phi_is_one_everywhere_for_the_same_matrix(d, m, seed):
    # U_Xⁱ ⊂ U_Xʲ (nested top directions), so ‖U_Xⁱᵀ U_Xʲ‖²_F = min(i, j): every entry, not only the diagonal, is 1
    X = gaussian(d, m, seed=seed)
    assert np.allclose(subspace_similarity(X, X), 1.0, atol=1e-12)


def test_phi_is_zero_for_orthogonal_subspaces():
    eye = np.eye(9)
    assert np.allclose(subspace_similarity(eye[:, :3], eye[:, 3:8]), 0.0, atol=1e-15)


def test_phi_on_a_hand_made_example():
    # X's columns are e₀ and 2·e₁: its top direction is e₁. Y = X with the first column scaled by 4: the same plane,
    # but now e₀ is on top. So φ[0, 0] = cos²(90°) = 0, and every entry with i = 2 or j = 2 (the whole plane) is 1.
    X = np.zeros((5, 2))
    X[0, 0], X[1, 1] = 1.0, 2.0
    Y = X @ np.diag([4.0, 1.0])
    assert np.allclose(subspace_similarity(X, Y), [[0.0, 1.0], [1.0, 1.0]], atol=1e-12)


# --- φ depends on the singular directions only ------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(d=st.integers(2, 10), m=shapes, n=shapes, c=st.floats(1e-3, 1e3), seed=seeds)
def test_phi_is_invariant_to_rotations_within_each_subspace_and_to_scale(d, m, n, c, seed):
    # X @ Q = U Σ (Vᵀ Q): the same left singular vectors and values, so the same φ; c·X only scales Σ.
    X, Y = gaussian(d, m, seed=seed), gaussian(d, n, seed=seed + 1)
    phi = subspace_similarity(X, Y)
    assert np.allclose(subspace_similarity(X @ orthogonal(m, seed + 2), Y @ orthogonal(n, seed + 3)), phi, atol=1e-7)
    assert np.allclose(subspace_similarity(c * X, Y / c), phi, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(2, 10), m=shapes, n=shapes, seed=seeds)
def test_phi_is_invariant_to_rotating_the_whole_space(d, m, n, seed):
    # Q X and Q Y: U_X → Q U_X and U_Y → Q U_Y, and (Q U_X)ᵀ (Q U_Y) = U_Xᵀ U_Y
    X, Y, Q = gaussian(d, m, seed=seed), gaussian(d, n, seed=seed + 1), orthogonal(d, seed + 2)
    assert np.allclose(subspace_similarity(Q @ X, Q @ Y), subspace_similarity(X, Y), atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(3, 10), m=st.integers(2, 10), seed=seeds)
def test_scaling_columns_keeps_only_the_full_span_entries(d, m, seed):
    # X @ R (R invertible, e.g. column scaling) spans the same space but reorders the directions inside it: only
    # the entries that use all of X's span, row i = rank(X) and column j = rank(X), are guaranteed to stay 1.
    X = gaussian(d, m, seed=seed)
    R = np.diag(np.random.default_rng(seed).uniform(0.1, 10.0, m))
    phi = subspace_similarity(X, X @ R)
    rank = min(d, m)
    assert np.allclose(phi[rank - 1, :], 1.0, atol=1e-7) and np.allclose(phi[:, rank - 1], 1.0, atol=1e-7)


# --- φ of independent random subspaces: its expectation ---------------------------------------------------------
# Let U_j be a uniformly random j-frame in R^d and P = U_j U_jᵀ the projection onto its span. P's law is invariant
# under P → Q P Qᵀ for every orthogonal Q, so E[P] commutes with every Q and is c·I; tr P = j gives c = j/d.
# For U_i independent of U_j:  E‖U_iᵀ U_j‖²_F = E tr(U_iᵀ P U_i) = tr(U_iᵀ (j/d) I U_i) = i·j/d,
# hence E φ(i, j) = i·j / (d·min(i, j)) = max(i, j) / d.
# The top-i left singular vectors of a Gaussian X (d, m) are such a uniformly random frame: Q X has the same law
# as X, and its left singular vectors are Q U. So two independent Gaussian matrices give independent uniform frames.


@pytest.mark.parametrize("d, m, n", [(24, 6, 10), (12, 12, 4)])
def test_phi_of_random_subspaces_matches_its_expectation(d, m, n):
    draws = 2000
    phis = np.stack([subspace_similarity(gaussian(d, m, seed=2 * t), gaussian(d, n, seed=2 * t + 1))
                     for t in range(draws)])  # (draws, m, n)
    mean, se = mean_and_standard_error(phis)
    i, j = np.arange(1, m + 1)[:, None], np.arange(1, n + 1)[None, :]
    expected = np.maximum(i, j) / d
    assert (np.abs(mean - expected) <= 5 * se + 1e-12).all()  # + 1e-12: entries with max(i, j) = d are exactly 1


# --- amplification (§7.3, Table 7) ------------------------------------------------------------------------------


D_IN, D_OUT, K = 12, 20, 3
W_SPECTRUM = [10.0, 8.0, 6.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.25]  # distinct: W's top-k is well defined


def w_and_its_svd() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    W = with_spectrum(W_SPECTRUM, D_IN, D_OUT, seed=5)
    u, s, vt = np.linalg.svd(W, full_matrices=False)
    return W, u, s, vt.T


@pytest.mark.parametrize("c", [1.0, 0.01, 7.0])
def test_delta_w_equal_to_ws_top_k_part_has_amplification_c(c):
    # ΔW = c·W_k, W_k = U_k Σ_k V_kᵀ (W's best rank-k part). ΔW's top-k directions ARE W's, so
    # U_kᵀ W V_k = Σ_k and ‖Uᵀ W V‖_F = ‖Σ_k‖_F = ‖W_k‖_F for ΔW and for W alike, and the factor is
    # ‖c·W_k‖_F / ‖W_k‖_F = c exactly; c = 1 is "ΔW repeats W's top directions": no amplification at all.
    W, u, s, v = w_and_its_svd()
    amp = amplification(c * (u[:, :K] * s[:K]) @ v[:, :K].T, W, K)
    top_k_norm = np.sqrt((s[:K] ** 2).sum())
    assert amp.w_on_delta_w == pytest.approx(top_k_norm, rel=1e-10)
    assert amp.w_on_w == pytest.approx(top_k_norm, rel=1e-10)
    assert amp.factor == pytest.approx(c, rel=1e-10)
    assert amp.w_norm == pytest.approx(np.linalg.norm(W), rel=1e-12)
    # ‖ΔW‖/‖W‖ = c·‖W_k‖/‖W‖: the update's size next to W's, reported beside the factor
    assert amp.delta_w_over_w == pytest.approx(c * top_k_norm / np.linalg.norm(W), rel=1e-10)
    assert amp.to_dict()["delta_w_over_w"] == amp.delta_w_over_w and amp.to_dict()["factor"] == amp.factor


def test_delta_w_along_ws_weakest_directions_is_amplified():
    # The paper's reading of Table 7: ΔW amplifies directions W has but does not emphasise. Put ΔW on W's k
    # weakest directions with unit singular values: ‖Uᵀ W V‖_F = ‖σ_weakest‖_F, factor = √k / ‖σ_weakest‖_F.
    W, u, s, v = w_and_its_svd()
    amp = amplification(u[:, -K:] @ v[:, -K:].T, W, K)
    weakest = np.sqrt((s[-K:] ** 2).sum())
    assert amp.w_on_delta_w == pytest.approx(weakest, rel=1e-10)
    assert amp.factor == pytest.approx(np.sqrt(K) / weakest, rel=1e-10)
    assert amp.w_on_delta_w < amp.w_on_w  # W's own top directions carry more of W than ΔW's do


def test_amplification_is_the_same_in_the_papers_transposed_convention():
    # The paper's ΔW_p = ΔWᵀ and W_p = Wᵀ: U and V swap roles and Uᵀ W V transposes, norms unchanged.
    W = gaussian(D_IN, D_OUT, seed=1)
    dW = gaussian(D_IN, 4, seed=2) @ gaussian(4, D_OUT, seed=3)
    ours, papers = amplification(dW, W, K), amplification(dW.T, W.T, K)
    for field in ("delta_w_norm", "w_norm", "w_on_delta_w", "w_on_w", "factor"):
        assert getattr(papers, field) == pytest.approx(getattr(ours, field), rel=1e-10), field


# A random ΔW: for U (d_in, k) and V (d_out, k) the top-k singular vectors of a Gaussian ΔW,
#   E‖Uᵀ W V‖²_F = k² / (d_in·d_out) · ‖W‖²_F.
# ΔW → Q₁ ΔW keeps ΔW's law and its V, and maps U to Q₁ U; so given V, U U ᵀ is a projection whose law is invariant
# under rotations and, as for φ above, E[U Uᵀ | V] = (k/d_in)·I. Then
#   E‖UᵀWV‖²_F = E tr(Vᵀ Wᵀ (U Uᵀ) W V) = (k/d_in)·E tr(Wᵀ W V Vᵀ) = (k/d_in)·(k/d_out)·tr(Wᵀ W),
# using E[V Vᵀ] = (k/d_out)·I the same way (ΔW → ΔW Q₂ᵀ). (U U ᵀ and V Vᵀ do not depend on the SVD's signs.)
# The same holds for the "Random" column, whose U, V come from a Gaussian matrix independent of W. W is given a
# spread-out spectrum, so the test tells this formula apart from W's top-k energy (≈ 70% of ‖W‖²_F here).


@pytest.mark.parametrize("which", ["delta_w", "random"])
def test_projection_onto_random_directions_matches_its_expectation(which):
    W, *_ = w_and_its_svd()
    draws = 1500
    if which == "delta_w":
        samples = [amplification(gaussian(D_IN, D_OUT, seed=100 + t), W, K).w_on_delta_w for t in range(draws)]
    else:
        samples = [amplification(W, W, K, seed=100 + t).w_on_random for t in range(draws)]
    mean, se = mean_and_standard_error(np.array(samples) ** 2)
    expected = K**2 / (D_IN * D_OUT) * np.linalg.norm(W) ** 2
    assert abs(mean - expected) <= 5 * se


def test_a_float32_lora_update_has_only_r_directions():
    # A float32 A @ B of rank r has rounding-level singular values past r (≈ 1e-8 here, not 0): k may be r, not r+1
    A = gaussian(64, 4, seed=1).astype(np.float32)
    B = gaussian(4, 48, seed=2).astype(np.float32)
    W = gaussian(64, 48, seed=3).astype(np.float32)
    assert amplification(A @ B, W, 4).k == 4
    with pytest.raises(ValueError, match="numerical rank 4"):
        amplification(A @ B, W, 5)
    assert numerical_rank(A @ B) == 4
    # the same values cast to float64 look full rank: judged by float64's eps, float32's rounding is signal. So
    # pass ΔW in the dtype it was computed in (LoRALinear.delta_weight() keeps the model's dtype).
    assert numerical_rank((A @ B).astype(np.float64)) == 48


# --- the spectrum and the effective rank ------------------------------------------------------------------------


def test_singular_spectrum_of_a_known_spectrum():
    s = [4.0, 3.0, 0.0]
    spec = singular_spectrum(with_spectrum(s[:2], 6, 3, seed=1))  # singular values 4, 3, 0: ‖M‖_F = 5
    assert np.allclose(spec, [0.8, 0.6, 0.0], atol=1e-12)
    assert np.allclose(singular_spectrum(-3.0 * with_spectrum(s[:2], 6, 3, seed=1)), spec, atol=1e-12)


# squared singular values 0.5, 0.3, 0.15, 0.05 (cumulative 0.5, 0.8, 0.95, 1.0)
KNOWN = [np.sqrt(0.5), np.sqrt(0.3), np.sqrt(0.15), np.sqrt(0.05)]


@pytest.mark.parametrize("energy, k", [(0.9, 3), (0.5, 1), (0.8, 2), (0.81, 3), (0.95, 3), (0.96, 4), (1.0, 4),
                                       (0.1, 1)])
def test_effective_rank_of_a_known_spectrum(energy, k):
    # 0.8 and 0.95 sit exactly on a cumulative share: "at least" includes them (the rounding-slack case is energy=1.0,
    # in the known-rank test below, where the tail past the rank holds ~1e-32 of the energy instead of 0)
    assert effective_rank(7.0 * with_spectrum(KNOWN, 10, 8, seed=3), energy) == k


@settings(max_examples=40, deadline=None)
@given(d_in=shapes, d_out=shapes, r=shapes, seed=seeds)
def test_effective_rank_of_a_known_rank_matrix(d_in, d_out, r, seed):
    r = min(r, d_in, d_out)
    M = gaussian(d_in, r, seed=seed) @ gaussian(r, d_out, seed=seed + 1)  # rank r exactly (almost surely)
    assert effective_rank(M, energy=1.0) == r  # all the energy, and none in the rounding-level tail
    assert 1 <= effective_rank(M) <= r
    assert np.isclose((singular_spectrum(M) ** 2).sum(), 1.0)


def test_zero_update():
    assert effective_rank(np.zeros((4, 3))) == 0 and numerical_rank(np.zeros((4, 3))) == 0
    assert not singular_spectrum(np.zeros((4, 3))).any()


# --- inputs: device arrays, bad arguments -----------------------------------------------------------------------


def test_device_arrays_give_the_same_numbers(backend):
    X, Y, W = gaussian(8, 3, seed=1), gaussian(8, 5, seed=2), gaussian(8, 6, seed=3)
    dW = X @ gaussian(3, 6, seed=4)
    on = backend.to_device
    assert np.allclose(subspace_similarity(on(X), on(Y)), subspace_similarity(X, Y))
    assert amplification(on(dW), on(W), 2) == amplification(dW, W, 2)
    assert effective_rank(on(W)) == effective_rank(W)


ERRORS = [  # (call, message): each bad input is refused with a message that says what is wrong
    (lambda: subspace_similarity(gaussian(4, 2), gaussian(5, 2)), "same space"),
    (lambda: subspace_similarity(np.ones(4), np.ones((4, 2))), "2-D"),
    (lambda: subspace_similarity(gaussian(6, 3), gaussian(6, 3), max_i=4), r"max_i must be an integer in \[1, 3\]"),
    (lambda: subspace_similarity(gaussian(6, 3), gaussian(6, 3), max_j=0), "max_j must be"),
    (lambda: subspace_similarity(np.zeros((6, 3)), gaussian(6, 3)), "numerical rank 0"),
    (lambda: subspace_similarity(np.full((3, 2), np.nan), gaussian(3, 2)), "NaN"),
    (lambda: amplification(gaussian(4, 5), gaussian(5, 4), 1), "same shape"),
    (lambda: amplification(gaussian(4, 2) @ gaussian(2, 5), gaussian(4, 5), 3), "numerical rank 2"),
    (lambda: amplification(gaussian(4, 5), gaussian(4, 5), 5), r"k must be an integer in \[1, 4\]"),
    (lambda: amplification(gaussian(4, 5), gaussian(4, 5), True), "k must be an integer"),
    (lambda: effective_rank(gaussian(4, 5), energy=0.0), r"energy must be in \(0, 1\]"),
    (lambda: effective_rank(gaussian(4, 5), energy=1.5), "energy must be"),
]


@pytest.mark.parametrize("call, message", ERRORS)
def test_bad_inputs_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
