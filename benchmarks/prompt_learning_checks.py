"""Prefix and prompt tuning on SmolLM2 with left-padded batches, lightning-peft against HF PEFT with the same
tensors (the initial adapters that ``llm_sft_accuracy.py --run prefix`` / ``--run prompt`` save).

``--init <prefix adapter>``: does greedy ``generate()`` pick the token that the model's own forward pass ranks
first? The forward pass gets the position ids that ``generate()`` uses (each prompt starting at 0 after its
left padding).

``--prompt-init <prompt adapter>``: the first-token accuracy (``chat_eval.accuracy_by_first_token``) on
``--sentences`` validation sentences in left-padded batches of 16 and one by one (no padding): a model whose
output does not depend on the padding gives the same accuracy both ways.

    python benchmarks/prompt_learning_checks.py --init runs/llm_sft/prefix-init --prompts 8
    python benchmarks/prompt_learning_checks.py --prompt-init runs/llm_sft/prompt-init --sentences 100
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import lightning_peft as lp  # noqa: E402
from lightning_peft.packaged_models import resolve_model_path  # noqa: E402
from lightning_peft.tasks.chat_format import sst2_examples  # noqa: E402
from lightning_peft.tasks.common import default_data_dir  # noqa: E402
from lightning_peft.tasks.tsv_data import read_table, table_file  # noqa: E402


def agreement(model: Any, enc: dict[str, torch.Tensor], pad: int) -> list[bool]:
    """Per prompt: generate()'s first new token == argmax of the forward pass's last logits."""
    model.eval()
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # (B, L): what generate() uses
    with torch.no_grad():
        first = model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=pad)[:, -1]  # (B,)
        ranked = model(**enc, position_ids=positions).logits[:, -1].argmax(-1)  # (B,)
    return (first == ranked).tolist()


def both(folder: Path, path: str) -> list[tuple[str, Any]]:
    """lightning-peft and HF PEFT models holding the same adapter tensors."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    ours = AutoModelForCausalLM.from_pretrained(path)
    lp.load_adapter(ours, folder)
    theirs = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path), PeftConfig.from_pretrained(str(folder))
    )
    set_peft_model_state_dict(theirs, load_file(str(folder / "adapter_model.safetensors")))
    return [("lightning-peft", ours), ("HF PEFT", theirs)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--init", help="a prefix-tuning adapter folder (HF PEFT's layout)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-init", help="a prompt-tuning adapter folder (HF PEFT's layout)")
    parser.add_argument("--sentences", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = resolve_model_path("smollm2")
    if args.prompt_init:
        from lightning_peft.tasks.chat_eval import accuracy_by_first_token

        tokenizer = AutoTokenizer.from_pretrained(path)
        rows = read_table(table_file(default_data_dir("sst2"), "validation"))[: args.sentences]
        examples = sst2_examples(rows)
        for label, model in both(Path(args.prompt_init), path):
            padded = accuracy_by_first_token(model, tokenizer, examples, batch_size=16)
            alone = accuracy_by_first_token(model, tokenizer, examples, batch_size=1)
            print(f"{label}: {100 * padded:.1f}% in left-padded batches of 16, {100 * alone:.1f}% one by one")
    if not args.init:
        return
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    rows = read_table(table_file(default_data_dir("sst2"), "validation"))[: args.prompts]
    texts = [
        tokenizer.apply_chat_template(e.messages[:-1], tokenize=False, add_generation_prompt=True)
        for e in sst2_examples(rows)
    ]
    enc = dict(tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt"))
    pad = tokenizer.eos_token_id
    for label, model in both(Path(args.init), path):
        agree = agreement(model, enc, pad)
        print(
            f"{label}: generate()'s first token = the forward pass's argmax for {sum(agree)}/{len(agree)} prompts"
        )


if __name__ == "__main__":
    main()
