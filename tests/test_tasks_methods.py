"""Every PEFT method trains CausalLMSFT on a tiny random Llama: through the callback, the mixin, and packed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from tiny_llama import sentiment_rows, tiny_llama, tiny_tokenizer, write_jsonl

from lightning_peft import (
    IA3,
    Adapter,
    BitFit,
    DoRA,
    LoRA,
    PEFTCallback,
    PEFTMethod,
    PEFTMixin,
    PrefixTuning,
    PromptTuning,
    apply_peft,
    trainable_parameter_names,
)
from lightning_peft.tasks import CausalLMSFT, ChatDataModule

METHODS: dict[str, Any] = {
    "lora": lambda: LoRA(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "dora": lambda: DoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "ia3": lambda: IA3(),
    "pfeiffer": lambda: Adapter(placement="pfeiffer", bottleneck_size=8),
    "houlsby": lambda: Adapter(placement="houlsby", bottleneck_size=8),
    "prefix": lambda: PrefixTuning(num_virtual_tokens=4),
    "prompt": lambda: PromptTuning(num_virtual_tokens=4),
    "bitfit": lambda: BitFit(),
}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("chat")
    tiny_tokenizer().save_pretrained(folder / "tok")
    return folder / "tok", write_jsonl(folder / "train.jsonl", sentiment_rows(16))


def model_for(method: str) -> torch.nn.Module:
    # Llama has no bias terms; BitFit trains the biases of a Llama built with them
    if method == "bitfit":
        from transformers import LlamaForCausalLM

        base = tiny_llama(seed=0)
        config = base.config
        config.attention_bias = config.mlp_bias = True
        torch.manual_seed(0)
        return LlamaForCausalLM(config)
    return tiny_llama(seed=0)


class Snapshot(pl.Callback):
    """The trainable parameters when training starts (after the adapter is attached)."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def moved(self, module: pl.LightningModule) -> list[str]:
        """Trainable parameters whose value changed since the start."""
        params = dict(module.named_parameters())
        return [n for n, p in self.start.items() if not torch.equal(p, params[n].detach())]


def fit_two_steps(module: pl.LightningModule, data: ChatDataModule, callbacks: list[Any]) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=0,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)


def check_only_adapter_changed(module: pl.LightningModule, before: dict[str, torch.Tensor]) -> None:
    trainable = set(trainable_parameter_names(module))
    assert trainable
    after = dict(module.named_parameters())
    changed = {n for n, p in after.items() if n in before and not torch.equal(before[n], p.detach())}
    frozen_changed = {n for n in changed if n not in trainable}
    assert not frozen_changed, f"frozen base parameters changed: {sorted(frozen_changed)[:5]}"
    assert all(torch.isfinite(p).all() for n, p in after.items() if n in trainable)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_through_the_callback(method: str, data_files: tuple[Path, Path]) -> None:
    tok, train = data_files
    module = CausalLMSFT(model=model_for(method), lr=1e-2)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    data = ChatDataModule(train_file=str(train), model_name_or_path=str(tok), batch_size=4)
    snapshot = Snapshot()
    fit_two_steps(module, data, [PEFTCallback(METHODS[method](), verbose=False), snapshot])
    check_only_adapter_changed(module, before)
    # the method's trainable tensors moved in the two optimizer steps
    assert snapshot.start and snapshot.moved(module)


def test_bitfit_refuses_a_llama_without_biases() -> None:
    with pytest.raises(ValueError, match="BitFit found no bias parameters in LlamaForCausalLM"):
        apply_peft(tiny_llama(), BitFit())


class MixinSFT(PEFTMixin, CausalLMSFT):
    """CausalLMSFT with the adapter configured on the module itself."""

    def __init__(self, method: PEFTMethod, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.peft_method = method


def test_mixin_and_packing_train_lora(data_files: tuple[Path, Path]) -> None:
    tok, train = data_files
    module = MixinSFT(METHODS["lora"](), model=tiny_llama(seed=0), lr=1e-2)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    data = ChatDataModule(
        train_file=str(train), model_name_or_path=str(tok), batch_size=2, packing=True, max_length=64
    )
    fit_two_steps(module, data, [])
    check_only_adapter_changed(module, before)
    assert any(
        "lora_B" in n and not torch.equal(p, torch.zeros_like(p)) for n, p in module.named_parameters()
    )


def test_packing_with_prompt_tuning_refuses_clearly(data_files: tuple[Path, Path]) -> None:
    tok, train = data_files
    module = CausalLMSFT(model=tiny_llama(seed=0))
    data = ChatDataModule(train_file=str(train), model_name_or_path=str(tok), packing=True, max_length=64)
    with pytest.raises(ValueError, match="needs a 2D attention_mask"):
        fit_two_steps(module, data, [PEFTCallback(PromptTuning(num_virtual_tokens=4), verbose=False)])


def test_qlora_loads_nf4_with_activation_checkpointing_and_trains(
    data_files: tuple[Path, Path], tmp_path: Path
) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from tiny_llama import save_tiny

    tok, train = data_files
    # hidden 64: every weight fills whole 64-value bitsandbytes blocks
    folder = save_tiny(tmp_path / "tiny64", hidden=64)
    module = CausalLMSFT(
        model_name_or_path=str(folder), quantization="nf4-dq", activation_checkpointing=True, lr=1e-2
    )
    quantized = [n for n, m in module.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7 and not any("lm_head" in n for n in quantized)  # q,k,v,o,gate,up,down x 2
    assert module.model.is_gradient_checkpointing
    snapshot = Snapshot()
    data = ChatDataModule(train_file=str(train), model_name_or_path=str(tok), batch_size=4)
    fit_two_steps(module, data, [PEFTCallback(METHODS["lora"](), verbose=False), snapshot])
    assert any("lora_B" in n for n in snapshot.moved(module))
    assert set(trainable_parameter_names(module)) == {n for n in snapshot.start}
