"""The device audit (train.device_audit): GPU placement bugs caught on a CPU."""

from __future__ import annotations

import types

import pytest


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group, as a Ray Train worker on a CPU has."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist
    dist.destroy_process_group()


def recipe_stub(device):
    """What ``LoRAFinetuneRecipe.log_step`` reads of the recipe, on ``device``."""
    from raylora.recipe import StepWindow

    window = StepWindow()
    window.loss, window.labels, window.samples, window.tokens = 12.0, 6, 2, 40
    stub = types.SimpleNamespace(
        device=device,
        step=1,
        started=(0, 0.0),
        plan=types.SimpleNamespace(total_steps=4, steps_per_epoch=4),
        scheduler=types.SimpleNamespace(get_last_lr=lambda: [1e-4]),
        engine=types.SimpleNamespace(get_global_grad_norm=lambda: 0.5),
        logger=None,
        ray_metrics=None,
        progress=None,
        is_rank0=False,
    )
    return stub, window


def test_the_recipes_logged_step_reduces_on_the_recipes_device(process_group):
    """Bug report: log_step built its sums on the CPU and all-reduced them: NCCL raises "No backend
    type associated with device type cpu" at the first logged step on GPUs. The audit runs the real
    log_step; on the parent commit it raised DeviceAuditError naming raylora/train.py."""
    import torch

    from raylora.device_audit import device_audit
    from raylora.recipe import LoRAFinetuneRecipe

    stub, window = recipe_stub(torch.device("cpu"))
    with device_audit("cpu") as audit:
        loss = LoRAFinetuneRecipe.log_step(stub, window)
    assert loss == pytest.approx(2.0)
    assert audit.checked >= 1  # the all_reduce's tensor was looked at


def test_the_audit_names_where_a_host_tensor_was_made(process_group):
    """A tensor made by raylora's code without device= and handed to a collective."""
    import torch

    from raylora.device_audit import DeviceAuditError, device_audit
    from raylora.loss import allowed_attention

    with device_audit("cpu") as audit:
        # raylora code making tensors on the input's device: fine
        ok = allowed_attention(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
        process_group.all_reduce(ok.to(torch.int64))
        # the data stream's tensors count as on the host until moved
        (batch,) = audit.batches(iter([{"input_ids": torch.ones(2, dtype=torch.long)}]))
        with pytest.raises(DeviceAuditError, match="the data stream"):
            process_group.all_reduce(batch["input_ids"])
        process_group.all_reduce(batch["input_ids"].to("cpu"))  # placed: fine
        # a factory call in raylora's code without device=
        from raylora.device_audit import _target_device

        assert _target_device((ok, torch.float32), {}) is None
    from raylora import device_audit as module

    code = "import torch\ndef make():\n    return torch.tensor([1.0, 2.0])\n"
    namespace: dict = {}
    exec(compile(code, f"{module.PACKAGE}/made_here.py", "exec"), namespace)  # a file in the package
    with device_audit("cpu"):
        made = namespace["make"]()
        with pytest.raises(DeviceAuditError, match=r"made_here.py:3 \(torch.tensor without device=\)"):
            process_group.all_reduce(made)
        process_group.all_reduce(made.to(torch.device("cpu")))
