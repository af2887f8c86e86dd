"""Tiny models and LightningModules shared by the tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SST2_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
VOCAB = 100
SEQ = 12


def tiny_bert(num_labels: int = 2, seed: int = 0) -> nn.Module:
    return tiny_encoder(
        "BertForSequenceClassification",
        seed,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def with_biases(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """transformers initialises biases to zero; random ones make bias handling observable."""

    def build() -> nn.Module:
        model = factory()
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.add_(0.1 * torch.randn(param.shape, generator=g))
        return model

    return build


TINY_MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def tiny_encoder(model_class: str, seed: int = 0, **config: Any) -> nn.Module:
    """A tiny transformers encoder of ``model_class`` (e.g. "RobertaForSequenceClassification"), in eval mode;
    ``config`` overrides the sizes."""
    import transformers

    family = next(f for f in ("Roberta", "Bert") if model_class.startswith(f))
    torch.manual_seed(seed)
    sizes = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    settings = getattr(transformers, f"{family}Config")(**{**sizes, **config})
    return getattr(transformers, model_class)(settings).eval()


def tiny_batch(kind: str, batch: int = 4, seq: int = SEQ, seed: int = 1) -> dict[str, torch.Tensor]:
    """A deterministic batch with some padding, suited to the model kind."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if kind == "bert":
        attention_mask[0, -3:] = 0  # right padding
        input_ids[0, -3:] = 0
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": torch.randint(0, 2, (batch,), generator=g),
        }
    labels = input_ids.clone()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def model_output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits


class HFModule(pl.LightningModule):
    """Any transformers model trained on a fixed random dataset; ``configure_optimizers`` uses all params."""

    def __init__(self, kind: str = "bert", lr: float = 1e-2, seed: int = 0, optimizer: str = "adamw") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = TINY_MODELS[kind](seed=seed)
        self.model.train()

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    def configure_optimizers(self) -> Any:
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, kind: str, n: int = 16, seed: int = 1) -> None:
        self.data = tiny_batch(kind, batch=n, seed=seed)

    def __len__(self) -> int:
        return len(next(iter(self.data.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.data.items()}


def hf_loader(kind: str, n: int = 16, batch_size: int = 4) -> DataLoader:
    return DataLoader(DictDataset(kind, n), batch_size=batch_size, shuffle=False)


class TinyBertData(pl.LightningDataModule):
    """Tiny BERT batches as a data module (what a LightningCLI config names by class_path)."""

    def train_dataloader(self) -> DataLoader:
        return hf_loader("bert", n=8)

    def val_dataloader(self) -> DataLoader:
        return hf_loader("bert", n=4)

    def predict_dataloader(self) -> DataLoader:
        return hf_loader("bert", n=4)


class MLP(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


class MLPModule(pl.LightningModule):
    """A plain LightningModule around an ``nn.Module`` MLP."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def mlp_loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def fast_trainer(tmp_path: Path | str, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def peft_loads_our_folder(
    model: nn.Module, base: nn.Module, folder: Path, kind: str, head: bool, task_type: str | None
) -> nn.Module:
    """Save ``model``'s adapter (with its head nudged when ``head``), load it with HF PEFT onto ``base`` and check
    that the outputs and the adapter_config.json task_type agree. Returns the PEFT model."""
    import json

    import peft

    from lightning_peft import save_adapter

    batch = tiny_batch(kind)
    if head:
        with torch.no_grad():
            model.classifier.weight.add_(0.5)
    expected = model_output(model, batch)
    save_adapter(model, folder)
    assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == task_type
    loaded = peft.PeftModel.from_pretrained(base, str(folder))
    torch.testing.assert_close(model_output(loaded, batch), expected, atol=1e-5, rtol=0)
    return loaded


# -- prompt and prefix tuning ---------------------------------------------------------------------------
L = TypeVar("L", bound=nn.Module)


def tiny_with(kind: str, method: Any, seed: int = 0) -> nn.Module:
    """A tiny model of ``kind`` with ``method`` attached, its random init seeded by ``seed``."""
    from lightning_peft import apply_peft

    model = TINY_MODELS[kind](seed=seed)
    torch.manual_seed(seed)
    apply_peft(model, method)
    return model


def only_layer(model: nn.Module, layer_type: type[L]) -> L:
    """The one attached layer of ``layer_type`` (the wrapper that prompt and prefix tuning put in)."""
    from lightning_peft.ops.parameters import peft_layers

    layers = [layer for _, layer in peft_layers(model) if isinstance(layer, layer_type)]
    assert len(layers) == 1
    return layers[0]


class EmbeddingsAtStart(pl.Callback):
    """Records ``prompt_embeddings`` of the module's one ``layer_type`` layer once training starts."""

    def __init__(self, layer_type: type[nn.Module]) -> None:
        self.layer_type = layer_type

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.value = only_layer(pl_module, self.layer_type).prompt_embeddings.detach().clone()


def greedy_by_hand(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with a full forward pass per token and no cache."""
    for _ in range(steps):
        with torch.no_grad():
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


def generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int = 6) -> torch.Tensor:
    """Greedy ``generate()`` for exactly ``steps`` tokens (no end-of-sequence token stops it early)."""
    model.generation_config.eos_token_id = None
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0
    )


def every_method() -> dict[str, Callable[[], Any]]:
    """A small configuration of each of the 7 methods with default targets (BERT-sized tiny models)."""
    from lightning_peft import IA3, Adapter, BitFit, DoRA, LoRA, PrefixTuning, PromptTuning

    return {
        "lora": lambda: LoRA(r=4),
        "dora": lambda: DoRA(r=4),
        "ia3": IA3,
        "adapter": lambda: Adapter(bottleneck_size=4),
        "prefix": lambda: PrefixTuning(num_virtual_tokens=4),
        "prompt": lambda: PromptTuning(num_virtual_tokens=4),
        "bitfit": BitFit,
    }


def materialize(model: nn.Module) -> None:
    """Lightning's own meta-device materialisation (``to_empty``, then ``reset_parameters`` per module).

    Lightning warns about every module that has no ``reset_parameters``; for the base model's own modules (BERT's
    embeddings, T5's layer norm) that is expected here, but no lightning-peft layer may be among them."""
    import warnings

    from lightning.fabric.utilities.init import _materialize_distributed_module

    ours = {type(m).__name__ for m in model.modules() if getattr(m, "is_peft_layer", False)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _materialize_distributed_module(model, torch.device("cpu"))
    for warning in caught:
        message = str(warning.message)
        if "Parameter initialization incomplete" not in message:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
            continue
        named = message.split(":")[-1]
        assert not any(name in named.split(", ") for name in ours), (
            f"a PEFT layer left uninitialised: {message}"
        )
