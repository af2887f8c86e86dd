"""``lightning-peft export-adapter CKPT OUT``: an adapter-only ``.ckpt`` written as an adapter folder."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lightning_peft.cli.lightning_cli import write_base_and_labels
from lightning_peft.core.base_model import TASK_TYPES
from lightning_peft.core.record import attached_methods
from lightning_peft.files.save import save_adapter
from lightning_peft.inference.rebuild import load_adapted_model


# -- export-adapter ------------------------------------------------------------------------------------
def export_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-peft export-adapter",
        description="Write the adapter held in an adapter-only Lightning checkpoint (.ckpt) as an adapter "
        "folder (adapter_model.safetensors + adapter_config.json, HF PEFT's layout). The base model is rebuilt "
        "from what the checkpoint records (its name or path and its task: classifier, causal LM, ...).",
    )
    parser.add_argument("checkpoint", help="a .ckpt written while training with PEFTCallback/PEFTMixin")
    parser.add_argument("output", help="folder to write")
    parser.add_argument(
        "--model", default=None, help="base model (default: the checkpoint's model_name_or_path)"
    )
    parser.add_argument("--num-labels", type=int, default=None, help="default: from the checkpoint")
    parser.add_argument(
        "--task",
        default=None,
        choices=sorted(TASK_TYPES),
        help="HF PEFT task type of the base model (default: the one recorded in the checkpoint)",
    )
    args = parser.parse_args(list(argv))
    try:
        model, info = load_adapted_model(
            args.checkpoint, base_model=args.model, num_labels=args.num_labels, task_type=args.task
        )
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    folder = save_adapter(model, args.output)
    write_base_and_labels(folder, info["base_model"], info["labels"])
    methods = " + ".join(type(m).__name__ for m in attached_methods(model) or [])
    print(f"{methods} adapter written to {folder}")
    return 0
