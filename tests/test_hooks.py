"""analysis.hooks: the one "hooks on, windows through, hooks off" loop."""

from __future__ import annotations

import pytest
import torch

from sparse_expansion_plugin.analysis.hooks import hooks_attached, run_windows
from tests.conftest import make_tiny_llama


def test_run_windows_feeds_every_window_in_order_like_one_forward():
    model = make_tiny_llama()
    windows = torch.randint(3, 128, (5, 12), generator=torch.Generator().manual_seed(0))
    module = model.model.layers[1].mlp.up_proj
    seen: list[torch.Tensor] = []
    with hooks_attached([(module, lambda m, a, o: seen.append(o.reshape(-1, o.shape[-1])))]):
        run_windows(model, windows, batch_size=2, desc="test", progress=False)
    assert [len(x) for x in seen] == [24, 24, 12]  # batches of 2, 2 and 1 windows
    reference: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, a, o: reference.append(o.reshape(-1, o.shape[-1])))
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    torch.testing.assert_close(torch.cat(seen), reference[0], rtol=1e-5, atol=1e-6)
    assert not module._forward_hooks  # removed on exit


def test_hooks_are_removed_when_a_hook_raises():
    model = make_tiny_llama()
    modules = [model.model.layers[0].mlp.gate_proj, model.model.layers[1].mlp.down_proj]

    def broken(module, args, output):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"), hooks_attached((m, broken) for m in modules):
        run_windows(model, torch.ones(2, 4, dtype=torch.long), 1, "test", progress=False)
    assert all(not m._forward_hooks for m in modules)


@pytest.mark.parametrize(
    ("shape", "batch_size", "message"), [((8,), 2, r"\[n, L\]"), ((2, 4), 0, "batch_size")]
)
def test_run_windows_refuses_bad_input(shape, batch_size, message):
    with pytest.raises(ValueError, match=message):
        run_windows(make_tiny_llama(), torch.ones(shape, dtype=torch.long), batch_size, "test")
