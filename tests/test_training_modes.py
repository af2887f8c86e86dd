"""Gradient checkpointing (every method), ``torch.compile`` and ``precision="bf16-mixed"`` on CPU."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import HFModule, MLPModule, fast_trainer, hf_loader, mlp_loader, snapshot, tiny_batch, tiny_bert
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from torch import nn

from lightning_peft import (
    LoRA,
    PEFTCallback,
    adapter_state_dict,
    apply_peft,
    available_methods,
    load_adapter,
    load_peft_checkpoint,
    save_adapter,
    trainable_parameter_names,
)
from lightning_peft.core.base_model import set_activation_checkpointing
from lightning_peft.distributed import enable_input_grads
from lightning_peft.methods import PEFTLayer, get_method_class

#: methods that act on their own (AdapterFusion fuses adapters already on the model: tests/test_adapterhub.py,
#: tests/test_adapter_fusion.py)
ALONE = [name for name in available_methods() if name != "adapter_fusion"]


class GradCapture(Callback):
    """The gradients of the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if not self.grads:
            self.grads = {
                n: p.grad.detach().clone()
                for n, p in pl_module.named_parameters()
                if p.requires_grad and p.grad is not None
            }


def reference_grads(module: HFModule, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    module = copy.deepcopy(module)
    module.model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("name", ALONE)
def test_gradient_checkpointing_gives_the_gradients_of_a_normal_step(
    name: str, use_reentrant: bool, tmp_path: Path
) -> None:
    """Every method's default configuration on tiny BERT, with a frozen embedding: the first step's
    gradients with checkpointing equal those without, and every adapter tensor gets one."""
    method = get_method_class(name)()
    module = HFModule("bert")
    for sub in module.modules():  # deterministic: the reference and the run must see the same graph
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
    torch.manual_seed(0)
    try:
        apply_peft(module, method)  # attached up front, so both runs start from the same adapter init
    except NotImplementedError:
        pytest.skip(f"{name} is not implemented yet")
    batch = tiny_batch("bert", batch=4)
    expected = reference_grads(module, batch)
    trainable = trainable_parameter_names(module)
    assert trainable and set(expected) == set(trainable), name

    set_activation_checkpointing(module.model, use_reentrant=use_reentrant)
    # transformers < 5 does not hook the embeddings for gradient checkpointing; lightning-peft must
    module.model.disable_input_require_grads()
    capture = GradCapture()
    trainer = fast_trainer(tmp_path, max_steps=1, callbacks=[PEFTCallback(method, verbose=False), capture])
    trainer.fit(module, hf_loader("bert", n=4, batch_size=4))
    assert set(capture.grads) == set(expected), sorted(set(expected) ^ set(capture.grads))
    for key, grad in expected.items():
        torch.testing.assert_close(capture.grads[key], grad, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")


def test_reentrant_checkpointing_without_input_grads_loses_the_adapter_gradients() -> None:
    """Why lightning-peft hooks the embeddings: without it, reentrant checkpointing silently drops the
    gradients of every adapter inside a checkpointed block."""
    model = tiny_bert().train()
    apply_peft(model, LoRA(r=4, modules_to_save=["classifier"]))
    set_activation_checkpointing(model, use_reentrant=True)
    model.disable_input_require_grads()
    batch = tiny_batch("bert", batch=4)

    def lora_grads() -> list[torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: "None of the inputs have requires_grad=True"
            model(**batch).loss.backward()  # the classifier still gets gradients: no error
        return [p.grad for n, p in model.named_parameters() if "lora_" in n]  # A, B, A, B, ...

    assert all(g is None for g in lora_grads())
    assert enable_input_grads(model) == ["BertForSequenceClassification"]
    grads = lora_grads()
    assert all(g is not None for g in grads)
    assert all(g.abs().sum() > 0 for g in grads[1::2])  # lora_B (lora_A's is 0 while B is still 0)
    assert enable_input_grads(model) == []  # idempotent: the hook is there


def test_transformers_own_input_hook_is_kept() -> None:
    model = tiny_bert().train()
    apply_peft(model, LoRA(r=4))
    set_activation_checkpointing(model)  # transformers 5 hooks the embeddings itself
    hooks = list(getattr(model, "_require_grads_hooks", []))
    assert enable_input_grads(model) == []
    assert list(getattr(model, "_require_grads_hooks", [])) == hooks


class WrappedBlocks(HFModule):
    """torch's activation-checkpoint wrapper around every BERT layer, applied in ``configure_model`` after
    PEFTCallback attached (what FSDP2 recipes and ``FSDPStrategy(activation_checkpointing_policy=...)`` do).
    The wrapper adds ``_checkpoint_wrapped_module.`` to parameter names but not to state_dict keys."""

    def configure_model(self) -> None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointWrapper,
            apply_activation_checkpointing,
        )
        from transformers.models.bert.modeling_bert import BertLayer

        if not any(isinstance(m, CheckpointWrapper) for m in self.modules()):
            apply_activation_checkpointing(self.model, check_fn=lambda m: isinstance(m, BertLayer))


def test_activation_checkpoint_wrappers_checkpoint_resume_and_save(tmp_path: Path) -> None:
    from distributed_script import SeedAtSetup

    def fit(epochs: int, ckpt_path: Path | None = None) -> tuple[WrappedBlocks, pl.Trainer]:
        module = WrappedBlocks()
        callbacks = [SeedAtSetup(), PEFTCallback(LoRA(r=4, modules_to_save=["classifier"]), verbose=False)]
        trainer = fast_trainer(tmp_path, max_epochs=epochs, callbacks=callbacks)
        trainer.fit(module, hf_loader("bert"), ckpt_path=ckpt_path)
        return module, trainer

    module, trainer = fit(1)
    assert any("_checkpoint_wrapped_module." in n for n, _ in module.named_parameters())
    adapter = adapter_state_dict(module)
    assert len(adapter) == 10 and not any("_checkpoint_wrapped_module" in k for k in adapter)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    assert set(torch.load(tmp_path / "one.ckpt", weights_only=False)["state_dict"]) == set(adapter)
    # resume == uninterrupted
    resumed, _ = fit(2, tmp_path / "one.ckpt")
    straight, _ = fit(2)
    for key, value in adapter_state_dict(straight).items():
        torch.testing.assert_close(adapter_state_dict(resumed)[key], value, rtol=0, atol=1e-7)
    # the adapter file uses plain names: it loads onto an unwrapped model
    save_adapter(straight, tmp_path / "adapter")
    plain = load_adapter(tiny_bert(), tmp_path / "adapter")
    params = dict(plain.named_parameters())
    for key, value in adapter_state_dict(straight).items():
        assert torch.equal(params[key.removeprefix("model.")], value)
    loaded = load_peft_checkpoint(WrappedBlocks, tmp_path / "one.ckpt")
    for key, value in adapter_state_dict(loaded).items():
        assert torch.equal(value, adapter[key])


class CompiledMLP(MLPModule):
    """``torch.compile`` on the inner network, in ``configure_model`` (after PEFTCallback attached in setup).

    (``trainer.fit(torch.compile(lightning_module))`` fails in Dynamo on ``self.log`` with torch 2.13 and
    Lightning 2.6, with or without an adapter, so compiling the network is the pattern to use.)
    """

    def configure_model(self) -> None:
        if not isinstance(self.net, torch._dynamo.eval_frame.OptimizedModule):
            self.net = torch.compile(self.net)


def test_torch_compile_trains_a_lora_model(tmp_path: Path) -> None:
    module = CompiledMLP(lr=0.05)
    before = snapshot(module)
    trainer = fast_trainer(
        tmp_path,
        max_epochs=2,
        callbacks=[PEFTCallback(LoRA(r=4, target_modules=["fc1", "fc2"]), verbose=False)],
    )
    trainer.fit(module, mlp_loader())
    assert isinstance(module.net, torch._dynamo.eval_frame.OptimizedModule)
    adapter = adapter_state_dict(module)
    assert sorted(adapter) == [f"net._orig_mod.{m}.lora_{x}" for m in ("fc1", "fc2") for x in ("A", "B")]
    assert all(adapter[f"net._orig_mod.{m}.lora_B"].abs().max() > 1e-3 for m in ("fc1", "fc2"))  # trained
    for name, param in module.named_parameters():  # the frozen weights did not move
        if not param.requires_grad:
            assert torch.equal(param, before[name.replace("_orig_mod.", "").replace(".base_layer", "")]), name
    # the compiled forward computes what the eager module computes (same batch shape: no recompilation)
    x = next(iter(mlp_loader()))[0]
    torch.testing.assert_close(module.net(x), module.net._orig_mod(x))
    # adapter-only checkpoint, loaded into a fresh (compiled) module
    trainer.save_checkpoint(tmp_path / "compiled.ckpt")
    checkpoint = torch.load(tmp_path / "compiled.ckpt", weights_only=False)
    assert sorted(checkpoint["state_dict"]) == sorted(adapter)
    loaded = load_peft_checkpoint(CompiledMLP, tmp_path / "compiled.ckpt")
    params = dict(loaded.named_parameters())
    for key, value in adapter.items():
        assert torch.equal(params[key].detach(), value)


def test_bf16_mixed_trains_with_fp32_adapter_weights(tmp_path: Path) -> None:
    module = HFModule("bert", lr=1e-2)
    before = snapshot(module)
    output_dtypes: set[torch.dtype] = set()

    class Watch(Callback):
        def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            for sub in pl_module.modules():
                if isinstance(sub, PEFTLayer):
                    sub.register_forward_hook(lambda m, i, o: output_dtypes.add(o.dtype))

    method = LoRA(r=4, modules_to_save=["classifier"])
    trainer = fast_trainer(
        tmp_path,
        precision="bf16-mixed",
        max_epochs=2,
        callbacks=[PEFTCallback(method, verbose=False), Watch()],
    )
    trainer.fit(module, hf_loader("bert"))
    assert output_dtypes == {torch.bfloat16}  # the layers did run under bf16 autocast
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    adapter = adapter_state_dict(module)
    assert all(t.dtype == torch.float32 for t in adapter.values())
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert all(adapter[k].abs().max() > 1e-3 for k in adapter if k.endswith("lora_B"))  # trained
    for name, param in module.named_parameters():
        assert param.dtype == torch.float32, name
        if not param.requires_grad:
            key = name.replace(".base_layer", "")
            assert torch.equal(param, before[key]), name  # frozen weights untouched
    save_adapter(module, tmp_path / "adapter")
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())


def test_reentrant_checkpointing_is_detected() -> None:
    """What the DDP check for prefix tuning relies on (transformers' switch and torch's wrapper)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    from lightning_peft.distributed.activation_checkpointing import _reentrant_checkpointing

    model = tiny_bert()
    assert not _reentrant_checkpointing(model)
    set_activation_checkpointing(model, use_reentrant=False)
    assert not _reentrant_checkpointing(model)
    set_activation_checkpointing(model, use_reentrant=True)
    assert _reentrant_checkpointing(model)
    for impl, expected in ((CheckpointImpl.NO_REENTRANT, False), (CheckpointImpl.REENTRANT, True)):
        wrapped = nn.Sequential(checkpoint_wrapper(nn.Linear(2, 2), checkpoint_impl=impl))
        assert _reentrant_checkpointing(wrapped) is expected
