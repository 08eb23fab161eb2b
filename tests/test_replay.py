"""GraphReplay: one CUDA graph per input signature, replayed with new values; a direct call
elsewhere."""

from __future__ import annotations

import pytest
import torch
from devices import CUDA

from forcecalc.replay import GraphReplay, check_replay, padded_size


def _affine(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fixed shapes, no host synchronisation: capturable."""
    x, w = inputs["x"], inputs["w"]
    return {"y": x @ w + 1.0, "total": (x * x).sum().view(1)}


def _inputs(n: int, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    w = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    return {"x": x.to(device), "w": w.to(device)}


def _expected(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _affine({k: v.cpu() for k, v in inputs.items()})


def test_off_cuda_the_function_is_called_directly():
    """On the CPU there is no graph: the outputs are the function's, nothing is captured."""
    replay = GraphReplay(_affine, "cpu")
    assert not replay.uses_graphs
    for seed in range(3):
        inputs = _inputs(5, seed)
        out = replay(inputs)
        for name, value in _expected(inputs).items():
            torch.testing.assert_close(out[name], value, rtol=0, atol=0)
    assert replay.captures == 0


def test_padded_size_is_a_coarse_capacity():
    """Capacities take one value over ranges of sizes (few distinct graphs) and waste at most
    25% (sizes above 8)."""
    sizes = [padded_size(n) for n in range(0, 5000)]
    assert all(size >= n for n, size in enumerate(sizes))
    assert all(size <= 1.25 * n for n, size in enumerate(sizes) if n > 8)
    allowed = {m << k for m in (8, 10, 12, 14) for k in range(10)}
    assert sizes == sorted(sizes) and set(sizes) == {a for a in allowed if a <= 5120}


def test_a_replay_that_differs_from_the_eager_call_is_an_error():
    """The first replay of every capture is checked against the eager warm-up: equal to
    rounding passes (non-finite entries too, where they match), anything else raises."""
    expected = {"energy": torch.tensor([1.0, -2.0]), "stress": torch.tensor([float("inf"), 0.0])}
    check_replay({k: v.clone() for k, v in expected.items()}, expected)
    check_replay({"energy": torch.tensor([1.00001, -2.0]), "stress": expected["stress"]}, expected)
    for wrong in (
        {"energy": torch.tensor([1.1, -2.0]), "stress": expected["stress"]},
        {"energy": expected["energy"], "stress": torch.tensor([1.0, 0.0])},
        {"energy": expected["energy"]},
        {"energy": expected["energy"][:1], "stress": expected["stress"]},
    ):
        with pytest.raises(RuntimeError, match="differs from the eager call"):
            check_replay(wrong, expected)


def test_max_graphs_must_be_positive():
    """A replay cache that may hold no graph is refused when it is made."""
    with pytest.raises(ValueError, match="max_graphs"):
        GraphReplay(_affine, "cpu", max_graphs=0)


@CUDA
def test_replay_gives_the_new_values_results():
    """A captured graph replays with each call's values (copied into its input buffers from
    the CPU or the GPU; an entry that is the previous call's very tensor is not copied
    again); one capture per signature; outputs are fresh tensors, not the graph's buffers
    that the next replay overwrites."""
    replay = GraphReplay(_affine, "cuda")
    outputs = []
    for seed in range(4):
        inputs = _inputs(6, seed, device="cpu" if seed % 2 else "cuda")
        out = replay(inputs)
        for name, value in _expected(inputs).items():
            torch.testing.assert_close(out[name].cpu(), value, rtol=1e-12, atol=1e-12)
        outputs.append((inputs, out))
    assert replay.captures == 1
    for inputs, out in outputs:
        torch.testing.assert_close(out["y"].cpu(), _expected(inputs)["y"], rtol=1e-12, atol=1e-12)
    # the same tensor for "w" as in the last call (not copied again), a new "x"
    last = outputs[-1][0]
    moved = {**last, "x": _inputs(6, 99, device=last["x"].device.type)["x"]}
    torch.testing.assert_close(
        replay(moved)["y"].cpu(), _expected(moved)["y"], rtol=1e-12, atol=1e-12
    )


@CUDA
def test_a_new_signature_is_captured_and_old_graphs_are_dropped():
    """Another shape is another graph; beyond ``max_graphs`` the least recently used one is
    dropped and captured again when its shape returns."""
    replay = GraphReplay(_affine, "cuda", max_graphs=2)
    for n, captures in ((6, 1), (7, 2), (6, 2), (8, 3), (7, 4)):
        inputs = _inputs(n, n)
        torch.testing.assert_close(
            replay(inputs)["y"].cpu(), _expected(inputs)["y"], rtol=1e-12, atol=1e-12
        )
        assert replay.captures == captures
