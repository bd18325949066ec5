"""Each merge method against a direct formula written here independently (numpy, sorting, loops)."""

from __future__ import annotations

import math
import random
from typing import Annotated

import numpy as np
import pytest
import torch

from posthoc import sparsify
from posthoc.errors import ConfigError, OutputError
from posthoc.merge.config import MergeConfig
from posthoc.merge.modules import linear_coefficients
from posthoc.merge.registry import REGISTRY, Param, PerModel, Required, get_method, merge_method


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def call(name, tensors, base, clone=True, **params):
    """Run a method with its defaults for the parameters not given (on copies of the inputs unless clone=False)."""
    method = get_method(name)
    kwargs = {}
    for spec in method.params.values():
        if spec.name in params:
            kwargs[spec.argument] = params[spec.name]
        elif not spec.required:
            kwargs[spec.argument] = [spec.default] * len(tensors) if spec.scope.per_model else spec.default
    if method.randomized:
        kwargs["generator"] = torch.Generator().manual_seed(params.get("seed", 0))
    if clone:
        tensors, base = [t.clone() for t in tensors], None if base is None else base.clone()
    return method.fn(tensors, base, **kwargs)


# ------------------------------------------------------------------------------------------- kernels


@pytest.fixture(params=[sparsify.CHUNK_ELEMENTS, 64], ids=["one-chunk", "many-chunks"])
def chunked(request, monkeypatch):
    """Run the task-arithmetic family with its default chunks and with tiny ones (exercises the streaming)."""
    monkeypatch.setattr(sparsify, "CHUNK_ELEMENTS", request.param)
    if request.param < sparsify.WHOLE_ELEMENTS:
        monkeypatch.setattr(sparsify, "WHOLE_ELEMENTS", 0)
    return request.param


def top_k_mask(values: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    flat = values.reshape(-1)
    n = flat.numel()
    chunks = [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    top = sparsify.TopK(k, n)
    sparsify.fit_top_k(sparsify.Deltas(lambda: ((s, flat[s]) for s in chunks)), [top])
    return torch.cat([top.keep(s, flat[s]) != 0 for s in chunks])


TOP_K_CASES = [
    (n, k, chunk)
    for n, k in [(1, 1), (10, 3), (1000, 1), (1000, 999), (100_000, 20_000), (2_000_000, 400_000)]
    for chunk in (7, 1000, 10**6)
    if n // chunk <= 2000  # tiny chunks on big tensors only cost time
]


@pytest.mark.parametrize("n,k,chunk", TOP_K_CASES)
def test_top_k_matches_sort(n, k, chunk):
    values = rand(n, seed=n)
    mask = top_k_mask(values, k, chunk)
    expected = torch.zeros(n, dtype=torch.bool)
    expected[torch.argsort(values.abs(), descending=True, stable=True)[:k]] = True
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("chunk", [5, 1000])
def test_top_k_keeps_exactly_k_with_ties_broken_by_index(chunk):
    values = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.5])
    assert top_k_mask(values, 3, chunk).tolist() == [False, True, True, True, False, False]
    bf16_like = (rand(50_000, seed=3) * 1e-3).bfloat16().float()  # many equal magnitudes
    mask = top_k_mask(bf16_like, 10_000, chunk)
    expected = torch.zeros(50_000, dtype=torch.bool)
    expected[torch.argsort(bf16_like.abs(), descending=True, stable=True)[:10_000]] = True
    assert torch.equal(mask, expected)


def test_top_k_survives_a_sample_in_step_with_the_data(monkeypatch):
    """Exactly the sampled blocks hold large entries, so the sample brackets the wrong buckets: the exact histogram
    pass must take over and give the same selection as a sort."""
    stride = sparsify.SAMPLE_STRIDE
    values = rand(stride * sparsify.SAMPLE_BLOCK * 100, seed=4).abs()
    values.view(-1, stride * sparsify.SAMPLE_BLOCK)[:, : sparsify.SAMPLE_BLOCK] += 10.0
    calls = []
    exact = sparsify._exact_brackets
    monkeypatch.setattr(sparsify, "_exact_brackets", lambda *a: calls.append(1) or exact(*a))
    k = values.numel() // 5
    expected = torch.zeros(values.numel(), dtype=torch.bool)
    expected[torch.argsort(values, descending=True, stable=True)[:k]] = True
    assert torch.equal(top_k_mask(values, k, 10**6), expected)
    assert calls, "the misleading sample was not detected"


@pytest.mark.parametrize("keep", [True, False], ids=["keys-kept", "keys-recomputed"])
def test_top_k_of_inputs_read_chunk_by_chunk(keep, monkeypatch):
    """Inputs read by chunks (like the merge engine's lazy readers): with the keys kept between the fit's
    passes the inputs are read twice (keys and sample, then the gather), without three times; the
    threshold and cut are those of the same task vector in memory."""
    if not keep:
        monkeypatch.setattr(sparsify, "KEEP_KEYS_ELEMENTS", 0)
    base32 = rand(300, 400, seed=1)
    base = base32.bfloat16().reshape(-1)
    x = (base32 + 2e-3 * rand(300, 400, seed=2)).bfloat16().reshape(-1)
    reads = []

    class ChunkReader:
        def __init__(self, tensor):
            self.tensor, self.dtype = tensor, tensor.dtype

        def __getitem__(self, s):
            reads.append(s)
            return self.tensor[s].clone()

    chunks = sparsify.row_chunks((300, 400), 400 * 37)
    n, k = x.numel(), x.numel() // 5
    top, reference = sparsify.TopK(k, n), sparsify.TopK(k, n)
    sparsify.fit_top_k(sparsify.TaskVector(ChunkReader(x), ChunkReader(base), chunks, torch.float32), [top])
    delta = x.float() - base.float()
    sparsify.fit_top_k(sparsify.Deltas(lambda: ((s, delta[s]) for s in chunks)), [reference])
    assert (top.threshold, top.cut) == (reference.threshold, reference.cut)
    assert len(reads) == (2 if keep else 3) * 2 * len(chunks)


def test_bfloat16_task_vector_keys_equal_the_float32_buckets():
    """Keys from one bfloat16 subtraction are the bfloat16 rounding of the float32 difference."""
    g = torch.Generator().manual_seed(0)
    exponents = torch.randint(-30, 10, (200_000,), generator=g).float()
    base = (torch.randn(200_000, generator=g) * 2**exponents).bfloat16()
    near = (base.float() * (1 + 1e-2 * torch.randn(200_000, generator=g))).bfloat16()
    far = (torch.randn(200_000, generator=g) * 2 ** exponents.flip(0)).bfloat16()  # other signs and scales
    for x in (near, far):
        vector = sparsify.TaskVector(x, base, [slice(0, x.numel())], torch.float32)
        piece = (x, base)
        f32 = sparsify._buckets(x.float() - base.float())
        assert torch.equal(vector.keys(piece, slice(None)), f32)


def test_ties_on_bfloat16_fine_tunes_matches_reference(chunked):
    """bf16 fine-tunes close to the base (most deltas exactly zero, the rest few values: many ties), large
    enough for the sampled top-k fit."""
    base32 = rand(150, 400, seed=1)
    base = base32.bfloat16()
    xs = [(base32 + 2e-3 * rand(150, 400, seed=20 + i)).bfloat16() for i in range(3)]
    w, dens = [1.0, 1.0, 1.0], [0.2, 0.05, 0.5]  # unit weights: sums of bf16 deltas are exact, so the
    got = call("ties", xs, base, weight=w, density=dens)  # elected sign never rests on a rounding
    expected = numpy_ties(base.float(), [x.float() for x in xs], w, dens)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------- linear family


def test_linear_weighted_average():
    xs = [rand(4, 5, seed=i) for i in range(3)]
    w = [0.2, 0.5, 1.3]
    expected = sum(wi * x for wi, x in zip(w, xs)) / sum(w)
    torch.testing.assert_close(call("linear", xs, None, weight=w), expected)
    torch.testing.assert_close(call("linear", xs, None, weight=w, normalize=False), expected * sum(w))


def test_task_arithmetic_formula(chunked):
    base = rand(6, 7, seed=9)
    xs = [base + 0.1 * rand(6, 7, seed=i) for i in range(3)]
    w = [0.3, 0.6, -0.2]
    expected = base + 0.7 * sum(wi * (x - base) for wi, x in zip(w, xs))
    torch.testing.assert_close(call("task_arithmetic", xs, base, weight=w, **{"lambda": 0.7}), expected)
    normalized = base + sum(wi * (x - base) for wi, x in zip(w, xs)) / sum(w)
    torch.testing.assert_close(call("task_arithmetic", xs, base, weight=w, normalize=True), normalized)


def numpy_ties(base, xs, weights, densities, normalize=True, lam=1.0):
    """TIES as in the paper / mergekit, with numpy and a stable argsort."""
    base = base.numpy().astype(np.float64)
    deltas = []
    for x, w, density in zip(xs, weights, densities):
        d = (x.numpy().astype(np.float64) - base).reshape(-1)
        k = max(1, int(density * d.size))
        keep = np.zeros(d.size, dtype=bool)
        keep[np.argsort(-np.abs(d), kind="stable")[:k]] = True
        deltas.append(np.where(keep, d, 0.0) * w)
    stacked = np.stack(deltas)
    majority = np.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(stacked) == majority
    mixed = (stacked * agree).sum(0)
    divisor = (np.array(weights)[:, None] * agree).sum(0)
    divisor[divisor == 0] = 1
    if normalize:
        mixed = mixed / divisor
    return torch.from_numpy((base.reshape(-1) + lam * mixed).reshape(base.shape)).float()


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference(normalize, chunked):
    base = rand(20, 30, seed=1)
    xs = [base + rand(20, 30, seed=10 + i) * 0.05 for i in range(3)]
    w, dens = [0.5, 1.0, 0.7], [0.2, 0.5, 0.1]
    got = call("ties", xs, base, weight=w, density=dens, normalize=normalize)
    torch.testing.assert_close(got, numpy_ties(base, xs, w, dens, normalize), atol=1e-6, rtol=1e-5)


def test_ties_all_zero_deltas_return_base(chunked):
    base = rand(5, 5)
    got = call("ties", [base.clone(), base.clone()], base, weight=[1.0, 1.0], density=[0.5, 0.5])
    torch.testing.assert_close(got, base)


def test_breadcrumbs_keeps_the_middle_band(chunked):
    base = torch.zeros(1000)
    x = rand(1000, seed=4)
    got = call("breadcrumbs", [x], base, weight=[1.0], density=[0.3], gamma=[0.1])
    order = np.argsort(np.abs(x.numpy()), kind="stable")
    n_bot = 1000 - 300 - 100
    keep = np.zeros(1000, dtype=bool)
    keep[order[n_bot : n_bot + 300]] = True
    torch.testing.assert_close(got, torch.from_numpy(np.where(keep, x.numpy(), 0.0)).float())
    # density 1: untouched, gamma ignored (mergekit semantics)
    torch.testing.assert_close(call("breadcrumbs", [x], base, weight=[1.0], gamma=[0.1]), x)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_drops_at_random_and_rescales_l1(method, chunked):
    base = rand(200, 300, seed=2)
    x = base + 0.01 * rand(200, 300, seed=3)
    got = call(method, [x], base, weight=[1.0], density=[0.3], seed=7)
    delta = x - base
    kept = (got - base).abs() > 0
    fraction = kept.float().mean().item()
    assert abs(fraction - 0.3) < 0.01  # 60,000 Bernoulli draws: 6 standard deviations
    ratio = delta.abs().sum() / (delta * kept).abs().sum()
    torch.testing.assert_close(got - base, delta * kept * ratio, atol=1e-6, rtol=1e-4)
    again = call(method, [x], base, weight=[1.0], density=[0.3], seed=7)
    other = call(method, [x], base, weight=[1.0], density=[0.3], seed=8)
    assert torch.equal(got, again) and not torch.equal(got, other)


def test_della_keeps_large_entries_more_often(chunked):
    base = torch.zeros(400, 500)
    x = rand(400, 500, seed=5)
    got = call("della_linear", [x], base, weight=[1.0], density=[0.5], epsilon=[0.3], rescale=False)
    kept = got != 0
    ranks = x.abs().argsort(1).argsort(1)
    low = kept[ranks < 50].float().mean().item()  # expected keep probability ≈ 0.2 + 0.6·(rank/499)
    high = kept[ranks >= 450].float().mean().item()
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    assert 0.2 < low < 0.29 and 0.71 < high < 0.8
    torch.testing.assert_close(got[kept], x[kept])


def test_della_rejects_density_epsilon_outside_unit_interval(tmp_path):
    from posthoc.merge.config import MergeConfig

    config = MergeConfig.from_dict(
        {"merge_method": "della", "base_model": "b", "models": [{"model": "m", "parameters": {"weight": 1, "density": 0.1}}]}
    )
    with pytest.raises(ConfigError, match="density ± epsilon"):
        config.resolve("x.weight", 0.0)


# ------------------------------------------------------------------------------------------- geometric


def numpy_slerp(t, a, b):
    a64, b64 = a.numpy().astype(np.float64).reshape(-1), b.numpy().astype(np.float64).reshape(-1)
    dot = np.clip(np.dot(a64 / np.linalg.norm(a64), b64 / np.linalg.norm(b64)), -1, 1)
    if abs(dot) > 0.9995:
        out = (1 - t) * a64 + t * b64
    else:
        theta = np.arccos(dot)
        out = (np.sin((1 - t) * theta) * a64 + np.sin(t * theta) * b64) / np.sin(theta)
    return torch.from_numpy(out.reshape(a.shape)).float()


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_formula(t):
    a, b = rand(8, 9, seed=1), rand(8, 9, seed=2)
    got = call("slerp", [b], a, t=t)
    torch.testing.assert_close(got, numpy_slerp(t, a, b), atol=1e-5, rtol=1e-5)
    if t == 0.0:
        torch.testing.assert_close(got, a)


def test_slerp_in_row_chunks_is_the_same_formula(monkeypatch):
    from posthoc import sparsify

    monkeypatch.setattr(sparsify, "CHUNK_ELEMENTS", 20)
    monkeypatch.setattr(sparsify, "WHOLE_ELEMENTS", 0)
    a, b = rand(30, 9, seed=3), rand(30, 9, seed=4)
    assert len(sparsify.row_chunks(a.shape)) > 5
    torch.testing.assert_close(call("slerp", [b], a, t=0.3), numpy_slerp(0.3, a, b), atol=1e-5, rtol=1e-5)


def test_slerp_of_parallel_vectors_is_linear():
    a = rand(10, seed=1)
    torch.testing.assert_close(call("slerp", [2 * a], a, t=0.25), 1.25 * a)


def test_slerp_preserves_norm_between_unit_vectors():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    got = call("slerp", [b], a, t=0.5)
    torch.testing.assert_close(got, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


def test_multislerp_two_orthogonal_unit_task_vectors():
    base = rand(2, seed=3)
    got = call("multislerp", [base + torch.tensor([1.0, 0.0]), base + torch.tensor([0.0, 1.0])], base, weight=[1.0, 1.0])
    # the spherical midpoint of two orthogonal unit vectors, with norm Σ wᵢ‖τᵢ‖ = 1
    torch.testing.assert_close(got - base, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6, rtol=1e-6)


def test_multislerp_of_a_tensor_no_model_changed_is_the_base():
    # Frozen tensors (embeddings of a LoRA-merged fine-tune, layers left alone) give zero task vectors: the
    # barycenter of nothing moved is the base, not an error (mergekit 0.1.5 raises here with three models).
    base = rand(8, 8, seed=4)
    for count in (2, 3):
        got = call("multislerp", [base.clone() for _ in range(count)], base, weight=[1.0] * count)
        assert torch.equal(got, base)


def test_multislerp_refuses_task_vectors_that_cancel_naming_the_tensor():
    base, tau = torch.zeros(16), rand(16, seed=6)  # a zero base: the task vectors are exactly ±tau
    inputs = [base + tau, base - tau, base + tau, base - tau]
    with pytest.raises(OutputError, match=r"^tensor layers\.0\.w: multislerp: the task vectors cancel out"):
        get_method("multislerp").merge_tensor("layers.0.w", inputs, base, weight=[1.0] * 4)


def test_model_stock_formula():
    base = rand(30, 40, seed=0)
    xs = [base + rand(30, 40, seed=i) * 0.1 for i in (1, 2, 3)]
    offsets = [(x - base).reshape(-1).double() for x in xs]
    cos = np.mean(
        [float(offsets[i] @ offsets[j] / (offsets[i].norm() * offsets[j].norm())) for i in range(3) for j in range(i + 1, 3)]
    )
    t = 3 * cos / (1 + 2 * cos)
    expected = t * sum(xs) / 3 + (1 - t) * base
    torch.testing.assert_close(call("model_stock", xs, base), expected, atol=1e-5, rtol=1e-5)


def test_passthrough_scale():
    x = rand(3, 3)
    torch.testing.assert_close(call("passthrough", [x], None, scale=[0.5]), 0.5 * x)


# ------------------------------------------------------------------------------------------- registry contract


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_honours_the_contract(name):
    """scikit-learn's check_estimator, for merge methods: shape kept, finite, inputs untouched, reproducible."""
    method = REGISTRY[name]
    base = rand(16, 12, seed=0)
    count = method.max_models or max(3, method.min_models)
    xs = [base + 0.1 * rand(16, 12, seed=i + 1) for i in range(count)]
    params = {}
    for spec in method.params.values():
        if spec.required:
            params[spec.name] = [0.5] * count if spec.scope.per_model else 0.5
    if "density" in method.params:
        params["density"] = [0.5] * count
    copies = [x.clone() for x in xs], base.clone()
    out = call(name, xs, base if method.base != "ignored" else None, clone=False, **params)
    again = call(name, xs, base if method.base != "ignored" else None, clone=False, **params)
    assert out.shape == base.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out, again)
    assert all(torch.equal(a, b) for a, b in zip(xs, copies[0])) and torch.equal(base, copies[1])
    assert method.paper.startswith("http") and method.summary
    for spec in method.params.values():
        assert spec.kind in (float, int, bool)


# Values a check may draw for a parameter, where its declared range alone would allow degenerate merges
# (weights that cancel, densities with too few entries, DELLA's density ± epsilon outside (0, 1)).
TEST_RANGES = {"weight": (0.2, 1.5), "scale": (0.2, 1.5), "lambda": (0.5, 1.5), "density": (0.3, 0.7),
               "gamma": (0.0, 0.2), "epsilon": (0.0, 0.25), "t": (0.0, 1.0), "eps": (1e-9, 1e-7)}


def random_arguments(method, count: int, rng: random.Random, defaults: bool = False) -> dict:
    """Keyword arguments of `method` (by Python name, per-model ones one per input) drawn at random, or with
    `defaults` its defaults (random values only where a parameter is required)."""
    def draw(spec):
        if spec.kind is bool:
            return rng.random() < 0.5
        low, high = TEST_RANGES.get(spec.name, (spec.scope.low or 0.0, spec.scope.high or 2.0))
        value = rng.uniform(low, high)
        return round(value) if spec.kind is int else value

    arguments = {}
    for spec in method.params.values():
        if defaults and not spec.required:
            value = [spec.default] * count if spec.scope.per_model else spec.default
        else:
            value = [draw(spec) for _ in range(count)] if spec.scope.per_model else draw(spec)
        arguments[spec.argument] = value
    if method.validate is not None:
        method.validate({spec.name: arguments[spec.argument] for spec in method.params.values()}, "test")
    return arguments


def run_method(method, tensors, base, arguments, seed=0):
    kwargs = dict(arguments)
    if method.randomized:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return method.fn([t.clone() for t in tensors], None if base is None else base.clone(), **kwargs)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_what_a_method_declares_linear_is(name):
    """`linear`: the output is Σ aᵢθᵢ (+ a₀θ₀) with coefficients set by the parameters alone, and where
    `linear_coefficients` reads coefficients off the method, output − θ₀ = Σ cᵢ(θᵢ − θ₀) on any inputs.
    A method that does not declare it is never given coefficients (the module path does not treat it as linear)."""
    method = REGISTRY[name]
    count = method.max_models or max(3, method.min_models)
    rng = random.Random(name)
    if not method.linear:
        for defaults in (True, False):
            assert linear_coefficients(method, random_arguments(method, count, rng, defaults), count) is None
        return

    def f(base, xs, arguments):
        return run_method(method, xs, None if method.base == "ignored" else base, arguments)

    read = 0
    for trial in range(6):
        arguments = random_arguments(method, count, rng, defaults=trial == 0)
        theta0 = rand(9, 7, seed=10 * trial).double()
        phis = [rand(9, 7, seed=10 * trial + i + 1).double() for i in range(count)]
        others = [rand(9, 7, seed=100 + 10 * trial + i).double() for i in range(count + 1)]
        xs = [theta0 + phi for phi in phis]
        combined = f(2 * theta0 - 3 * others[0], [2 * x - 3 * y for x, y in zip(xs, others[1:])], arguments)
        expected = 2 * f(theta0, xs, arguments) - 3 * f(others[0], others[1:], arguments)
        torch.testing.assert_close(combined, expected, rtol=1e-9, atol=1e-9)
        coefficients = linear_coefficients(method, arguments, count)
        if coefficients is not None:
            read += 1
            expected = sum(c * phi for c, phi in zip(coefficients, phis))
            torch.testing.assert_close(f(theta0, xs, arguments) - theta0, expected, rtol=1e-9, atol=1e-9)
    assert read, "no parameters tried made the method shift-equivariant: its coefficients were never checked"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_what_a_method_declares_on_task_vectors_is(name):
    """`on_task_vectors`: f(θ₀ + φ; θ₀) = θ₀ + f(φ; 0) with the same seed, for random parameters and inputs."""
    method = REGISTRY[name]
    if not method.on_task_vectors:
        return
    assert method.base != "ignored"
    count = max(3, method.min_models) if method.max_models is None else method.max_models
    rng = random.Random(name)
    for trial in range(4):
        arguments = random_arguments(method, count, rng, defaults=trial == 0)
        theta0 = rand(40, 30, seed=10 * trial).double()
        phis = [0.05 * rand(40, 30, seed=10 * trial + i + 1).double() for i in range(count)]
        on_base = run_method(method, [theta0 + phi for phi in phis], theta0, arguments, seed=trial)
        on_zero = run_method(method, phis, torch.zeros_like(theta0), arguments, seed=trial)
        torch.testing.assert_close(on_base, theta0 + on_zero, rtol=1e-9, atol=1e-9)


def test_the_family_declares_its_flags_and_shares_its_sparsifications():
    from posthoc.merge.methods import TASK_ARITHMETIC_FAMILY

    assert {m.name for m in REGISTRY.values() if m.on_task_vectors} == {m.name for m in TASK_ARITHMETIC_FAMILY}
    assert sorted(m.name for m in REGISTRY.values() if m.linear) == ["linear", "passthrough", "task_arithmetic"]
    for member in TASK_ARITHMETIC_FAMILY:
        method = REGISTRY[member.name]
        assert method.randomized == (member.sparsification is not None and member.sparsification.randomized)
        assert method.summary == member.summary and method.paper == member.paper
        if member.sparsification is not None:  # its own parameters, right after density
            own = [p.name for p in member.sparsification.params]
            names = list(method.params)
            assert names[1:2 + len(own)] == ["density", *own]


def test_a_new_family_member_is_one_declaration():
    """TIES with rescale on by default, declared in one place, merges like `ties` with rescale=True."""
    from posthoc.merge.methods import MAGNITUDE, FamilyMember
    from posthoc.merge.registry import register

    member = FamilyMember("ties_rescaled_test", MAGNITUDE, consensus=True, normalize=True, rescale=True,
                          paper="https://example.org/ties-rescaled", summary="TIES with the L1 norm kept")
    register(member.method())
    try:
        method = get_method("ties_rescaled_test")
        assert method.on_task_vectors and not method.linear and not method.randomized
        assert method.params["rescale"].default is True and list(method.params) == list(REGISTRY["ties"].params)
        base = rand(20, 30, seed=1)
        xs = [base + 0.05 * rand(20, 30, seed=10 + i) for i in range(3)]
        w, dens = [0.5, 1.0, 0.7], [0.2, 0.5, 0.1]
        expected = call("ties", xs, base, weight=w, density=dens, rescale=True)
        assert torch.equal(call("ties_rescaled_test", xs, base, weight=w, density=dens), expected)
    finally:
        REGISTRY.pop("ties_rescaled_test")


@pytest.fixture()
def throwaway():
    """Register test methods; they leave the registry after the test."""
    names = []

    def declare(fn, name, **options):
        merge_method(name, **options)(fn)
        names.append(name)
        return REGISTRY[name]

    yield declare
    for name in names:
        REGISTRY.pop(name, None)


def iterate(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel = Required,
    max_iter: int = 10,
    steps: Annotated[list[int], Param(per_model=True, low=1, high=100)] = 1,
) -> torch.Tensor:
    """A test method with integer parameters."""
    assert type(max_iter) is int and all(type(s) is int for s in steps)
    return tensors[0] * max_iter


def test_an_int_parameter_arrives_as_an_int(throwaway):
    method = throwaway(iterate, "iterate_test", base="ignored", paper="https://example.org/iterate")
    assert method.params["max_iter"].kind is int and method.params["steps"].kind is int
    assert "max_iter (global, integer, 10)" in method.describe()
    assert "steps (per model, integer, 1)" in method.describe()

    def resolved(**parameters):
        config = MergeConfig.from_dict({"merge_method": "iterate_test", "models": [
            {"model": "m", "parameters": {"weight": 1, **parameters.pop("per_model", {})}}], "parameters": parameters})
        return config.resolve("layers.0.weight", 0.0)

    for written in (10, 10.0):  # YAML `10` and `10.0`
        value = resolved(max_iter=written)["max_iter"]
        assert value == 10 and type(value) is int
    assert resolved()["max_iter"] == 10 and resolved(per_model={"steps": 3.0})["steps"] == [3]
    out = get_method("iterate_test").fn([torch.ones(2)], None, **resolved(max_iter=4.0))
    assert torch.equal(out, torch.full((2,), 4.0))
    for bad, expected in ((10.5, "an integer"), (True, "an integer"), ("ten", "must be an integer")):
        with pytest.raises(ConfigError) as error:
            resolved(max_iter=bad)
        message = str(error.value)
        assert "'max_iter'" in message and expected in message and "\n" not in message, message
    with pytest.raises(ConfigError, match=r"'steps'.* must be an integer in \[1, 100\], got 0"):
        resolved(per_model={"steps": 0})


def test_range_texts_read_right_for_numbers_and_integers():
    assert Param(low=0.0, high=1.0, low_open=True).range_text() == "a number in (0, 1]"
    assert Param(low=1).range_text(integer=True) == "an integer in [1, inf)"
    assert Param(low=1, high=1e6).range_text(integer=True) == "an integer in [1, 1000000]"
    assert Param(low=0.0, low_open=True).range_text() == "a number in (0, inf)"
    assert Param().range_text() == "a number" and Param().range_text(integer=True) == "an integer"


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ConfigError, match="valid methods: .*ties"):
        get_method("tie")


def test_registry_refuses_duplicates():
    from posthoc.merge.registry import register

    with pytest.raises(ValueError, match="twice"):
        register(REGISTRY["linear"])


def test_ties_rescale_preserves_l1_and_accepts_bf16(chunked):
    base = rand(30, 20, seed=1).bfloat16()
    x = (base.float() + 0.05 * rand(30, 20, seed=2)).bfloat16()
    got = call("ties", [x], base, weight=[1.0], density=[0.25], rescale=True)
    assert got.dtype == torch.float32
    delta = x.float() - base.float()
    kept = numpy_ties(base.float(), [x.float()], [1.0], [0.25]) - base.float()
    ratio = delta.abs().sum() / kept.abs().sum()
    torch.testing.assert_close(got, base.float() + kept * ratio, atol=1e-6, rtol=1e-5)

