import networkx as nx
import numpy as np
import pytest
from scipy.sparse.csgraph import laplacian
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from helpers import graphs as G

RNG = np.random.default_rng(0)
TWO_BLOCKS = np.array([[0.7, 0.1], [0.1, 0.5]])


def test_two_block_sbm_gives_dimension_two():
    A, _ = G.sbm([60, 60], TWO_BLOCKS, np.random.default_rng(1))
    sv = np.sort(np.abs(np.linalg.eigvalsh(A)))[::-1]
    assert G.select_dimension(sv, n_elbows=1) == [2]
    assert G.elbow_dimension(sv[None])[0] == 2
    assert G.select_dimension(sv, n_elbows=2)[0] == 2


def test_profile_likelihood_matches_a_direct_computation():
    d = np.array([9.0, 8.5, 3.0, 2.9, 2.8, 2.7])
    ll = G.profile_likelihood(d)
    for q in (1, 3, 6):
        a, b = d[:q], d[q:]
        sse = ((a - a.mean()) ** 2).sum() + (((b - b.mean()) ** 2).sum() if len(b) else 0)
        var = sse / (len(d) - 1 - (q < len(d)))
        direct = -len(d) / 2 * np.log(2 * np.pi * var) - sse / (2 * var)
        assert ll[q - 1] == pytest.approx(direct)
    assert np.argmax(ll) + 1 == 2


def test_omnibus_of_two_sbm_graphs_finds_two_communities():
    rng = np.random.default_rng(2)
    graphs, labels = zip(*[G.sbm([40, 40], TWO_BLOCKS, rng) for _ in range(3)])
    Z, vals = G.omnibus_embedding(np.stack(graphs), d=2)
    M = G.omnibus_matrix(np.stack(graphs))
    top = np.sort(np.abs(np.linalg.eigvalsh(M)))[::-1][:2]
    assert np.sort(np.abs(vals))[::-1] == pytest.approx(top, rel=1e-6)
    for z, lab in zip(Z, labels):
        pred = KMeans(2, n_init=5, random_state=0).fit_predict(z)
        assert adjusted_rand_score(lab, pred) == 1.0


def test_omnibus_matrix_blocks():
    A1, A2 = np.eye(2), np.ones((2, 2))
    M = G.omnibus_matrix(np.stack([A1, A2]))
    assert M[:2, :2] == pytest.approx(A1) and M[2:, 2:] == pytest.approx(A2)
    assert M[:2, 2:] == pytest.approx((A1 + A2) / 2)


def test_ase_recovers_a_rank_one_graph_and_procrustes_a_rotation():
    x = np.array([1.0, 2.0, 3.0])
    X = G.ase(np.outer(x, x), 1)
    assert X[:, 0] == pytest.approx(x)
    Y = RNG.standard_normal((10, 3))
    Q, _ = np.linalg.qr(RNG.standard_normal((3, 3)))
    assert (Y @ Q) @ G.procrustes(Y @ Q, Y) == pytest.approx(Y)
    with pytest.raises(ValueError):
        G.ase(np.triu(np.ones((3, 3))), 1)


def test_energy_test_and_latent_distribution_test():
    rng = np.random.default_rng(3)
    X, Y = rng.normal(0, 1, (40, 2)), rng.normal(0, 1, (40, 2))
    assert G.energy_test(X, Y, n_perm=200)[1] > 0.05
    assert G.energy_test(X, Y + 1.5, n_perm=200)[1] < 0.01
    assert G.energy_distance(X, X) == pytest.approx(0.0, abs=1e-12)
    assert G.energy_test(X, Y + 1.5, n_perm=10)[0] == pytest.approx(G.energy_distance(X, Y + 1.5))
    A1, _ = G.sbm([50, 50], TWO_BLOCKS, rng)
    A2, _ = G.sbm([50, 50], TWO_BLOCKS, rng)
    A3, _ = G.sbm([50, 50], np.full((2, 2), 0.3), rng)      # one block: another latent distribution
    assert G.latent_distribution_test(A1, A2, d=2, n_perm=200)[1] > 0.05
    assert G.latent_distribution_test(A1, A3, d=2, n_perm=200)[1] < 0.01


def test_simple_statistics_on_known_patterns():
    U = G.uniform_causal(5)
    assert G.attention_entropy(U) == pytest.approx(np.mean(np.log([2, 3, 4, 5])))
    assert G.sink_mass(U) == pytest.approx(np.mean([1 / 2, 1 / 3, 1 / 4, 1 / 5]))
    assert G.binarize(U, 1.0).sum() == 0                       # nothing above the uniform level
    assert G.gini(np.ones(4)) == pytest.approx(0.0)
    assert G.gini(np.array([0, 0, 0, 4.0])) == pytest.approx(3 / 4)
    assert G.gini(np.zeros(3)) == 0.0
    prev = np.eye(6, k=-1); prev[0, 0] = 1
    assert G.previous_token_score(prev) == pytest.approx(1.0)
    assert G.density(np.tril(np.ones((4, 4)), -1)) == pytest.approx(1.0)
    er = G.er_causal(30, 0.3, 200, np.random.default_rng(0))
    assert G.density(er).mean() == pytest.approx(0.3, abs=0.01)
    assert np.triu(er).sum() == 0
    both = G.er_causal(20, np.array([0.1, 0.6]), 300, np.random.default_rng(1))
    assert both.shape == (2, 300, 20, 20)
    assert G.density(both).mean(-1) == pytest.approx([0.1, 0.6], abs=0.01)


def test_induction_score_on_a_perfect_induction_pattern():
    period, n = 4, 9
    A = np.zeros((n, n)); A[:, 0] = 1
    for q in range(1 + period, n):
        A[q] = 0; A[q, q - period + 1] = 1
    assert G.induction_score(A, period) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        G.induction_score(A, 5)


def test_clustering_and_laplacian_match_networkx_and_scipy():
    rng = np.random.default_rng(4)
    B = np.tril(rng.random((12, 12)) < 0.4, -1).astype(float)
    assert G.clustering(B) == pytest.approx(nx.average_clustering(nx.from_numpy_array(B + B.T)))
    W = np.tril(rng.random((8, 8)), -1)
    S = (W + W.T) / 2
    assert G.laplacian_spectrum(W) == pytest.approx(np.linalg.eigvalsh(laplacian(S, normed=True)))
    K = np.ones((5, 5))                                          # complete graph: 0 and n/(n-1)
    assert G.laplacian_spectrum(K) == pytest.approx([0] + [5 / 4] * 4)
    two = np.zeros((4, 4)); two[1, 0] = two[3, 2] = 1            # two components: Fiedler value 0
    assert G.laplacian_spectrum(two)[1] == pytest.approx(0.0, abs=1e-12)


def test_lap_eigvals_are_the_laplacian_eigenvalues():
    rng = np.random.default_rng(5)
    A = np.tril(rng.random((6, 6)))
    A /= A.sum(1, keepdims=True)
    deg = A.sum(0) / (6 - np.arange(6))
    ev = np.sort(np.linalg.eigvals(np.diag(deg) - A).real)[::-1]
    assert G.lap_eigvals(A, 3) == pytest.approx(ev[:3])
    with pytest.raises(ValueError):
        G.lap_eigvals(A, 7)


def test_bad_input_raises():
    with pytest.raises(ValueError):
        G.attention_entropy(np.ones((3, 4)))
    with pytest.raises(ValueError):
        G.sink_mass(np.full((3, 3), np.nan))
    with pytest.raises(ValueError):
        G.select_dimension([1.0])


def test_crop_patterns_drops_left_padding():
    pattern = np.zeros((2, 1, 4, 4))
    pattern[0, 0] = G.uniform_causal(4)
    pattern[1, 0, 2:, 2:] = G.uniform_causal(2)
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    a, b = G.crop_patterns(pattern, mask)
    assert a.shape == (1, 4, 4) and b.shape == (1, 2, 2)
    assert b[0].sum(-1) == pytest.approx([1, 1])



def test_causal_rewire_keeps_out_degrees_and_causality():
    rng = np.random.default_rng(6)
    B = np.tril(rng.random((10, 10)) < 0.5, -1).astype(float)
    R = G.causal_rewire(B, 2000, rng)
    assert (R.sum(-1) == B.sum(-1)).all()
    assert np.triu(R).sum() == 0
    assert R.mean(0)[9, :9] == pytest.approx(np.full(9, B[9].sum() / 9), abs=0.05)   # uniform over visible keys
    assert G.causal_rewire(np.stack([B, B]), 3, rng).shape == (2, 3, 10, 10)
    with pytest.raises(ValueError):
        G.causal_rewire(np.ones((3, 3)), 2, rng)


def test_select_dimension_survives_two_values():
    assert G.select_dimension([5.0, 4.0, 1.0, 0.9], n_elbows=3)[0] == 2
