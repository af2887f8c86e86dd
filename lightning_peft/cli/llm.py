"""After fine-tuning a decoder LLM: ``lightning-peft generate``, ``chat``, ``merge`` and ``export-check``.

* ``generate --adapter PATH "prompt" ...`` answers each prompt (the tokenizer's chat template applied unless
  ``--raw``), streaming the tokens to stdout;
* ``chat --adapter PATH`` is a conversation over stdin (``/reset`` forgets it, ``/exit`` or end of input stops);
* ``merge --adapter PATH OUT`` folds the adapter into the base weights and writes a plain transformers folder
  (model + tokenizer) that ``AutoModelForCausalLM.from_pretrained(OUT)`` loads with the same outputs;
* ``export-check --adapter PATH`` says whether serving engines (vLLM, llama.cpp) load the adapter as it is or it
  must be merged first (:mod:`lightning_peft.files.serving`); exit status 1 when it does not serve as is.

The base model is the one recorded with the adapter (its task type picks ``AutoModelForCausalLM``), or
``--base-model``: a Hub name, a folder, or an alias of :mod:`lightning_peft.packaged_models` (``smollm2``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: the one task these commands build a base model for
CAUSAL_LM = "CAUSAL_LM"


def resolve_base(name: str) -> str:
    """A model alias (``smollm2``, ``minilm``) → its prepared local folder; any other name unchanged."""
    from lightning_peft.packaged_models import resolve_model_path

    return str(resolve_model_path(name))


def load_for_generation(
    adapter: str | None, base_model: str | None = None, device: str | None = None
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(causal LM with the adapter loaded, in eval mode; its tokenizer; what is known about the base).

    ``adapter=None`` gives the plain ``base_model`` (to compare with the adapted one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_peft.files.reader import read_adapter
    from lightning_peft.inference.rebuild import load_adapted_model
    from lightning_peft.library_noise import quiet_model_loading

    if adapter is None:
        if base_model is None:
            raise ValueError("give --adapter PATH, or --base-model NAME to use the base model alone")
        path = resolve_base(base_model)
        with quiet_model_loading():
            model = AutoModelForCausalLM.from_pretrained(path)
        info: dict[str, Any] = {"base_model": base_model, "task_type": CAUSAL_LM}
    else:
        recorded = read_adapter(adapter).base
        task = recorded.get("task_type") or CAUSAL_LM
        if task != CAUSAL_LM:
            raise ValueError(
                f"--adapter {adapter}: the adapter was trained on a {task} model; generate, chat and merge need "
                f"a {CAUSAL_LM} (decoder) adapter (use lightning-peft classify for SEQ_CLS)"
            )
        base = base_model or recorded.get("base_model_name_or_path")
        if base is None:
            raise ValueError(f"--adapter {adapter}: no base model is recorded with it; pass --base-model")
        path = resolve_base(base)
        model, info = load_adapted_model(adapter, base_model=path, task_type=CAUSAL_LM)
    tokenizer = AutoTokenizer.from_pretrained(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer, {**info, "path": path}


def encode(tokenizer: Any, messages: list[dict[str, str]], raw: bool) -> dict[str, torch.Tensor]:
    """Token ids for ``messages`` through the chat template with the generation prompt (``raw``: the last
    message's text as it is)."""
    if raw:
        return dict(tokenizer(messages[-1]["content"], return_tensors="pt"))
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the base model's tokenizer has no chat template; pass --raw to use the prompt as is"
        )
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(tokenizer(text, add_special_tokens=False, return_tensors="pt"))


def generation_kwargs(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """``generate()`` options from the command line: greedy unless sampling is asked for."""
    sampling = args.do_sample
    if sampling is None:  # neither --do-sample nor --greedy: sample when a sampling option was given
        sampling = any(v is not None for v in (args.temperature, args.top_p, args.top_k))
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": sampling}
    if sampling:
        kwargs.update(
            temperature=args.temperature if args.temperature is not None else 0.7,
            top_p=args.top_p if args.top_p is not None else 0.9,
            top_k=args.top_k if args.top_k is not None else 50,
        )
    else:  # a model's generation_config may default to sampling values; greedy ignores them
        kwargs.update(temperature=None, top_p=None, top_k=None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs["pad_token_id"] = pad
    return kwargs


@torch.no_grad()
def respond(
    model: nn.Module, tokenizer: Any, inputs: dict[str, torch.Tensor], kwargs: dict[str, Any], stream: bool
) -> str:
    """Generate an answer to ``inputs`` (streamed to stdout when ``stream``) and return its text."""
    from transformers import TextStreamer

    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    out = model.generate(**inputs, streamer=streamer, **kwargs)  # type: ignore[operator]
    new = out[0, inputs["input_ids"].shape[1] :]  # (new tokens,)
    return tokenizer.decode(new, skip_special_tokens=True)


def _common(parser: argparse.ArgumentParser, adapter_required: bool = True) -> None:
    parser.add_argument(
        "--adapter", required=adapter_required, default=None, help="adapter folder (or adapter-only .ckpt)"
    )
    parser.add_argument(
        "--base-model",
        default=None,
        help="base model name, folder or alias ('smollm2'); default: the one recorded with the adapter",
    )


def _sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=None, help="a system message put before the conversation")
    parser.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 0.7)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 0.9)")
    parser.add_argument(
        "--top-k", type=int, default=None, help="sample among the k likeliest (default 50; 0: all)"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--do-sample", dest="do_sample", action="store_true", default=None, help="sample")
    group.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding (default)")
    parser.add_argument("--seed", type=int, default=None, help="seed the sampling")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def _check_sampling(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max_new_tokens <= 0:
        parser.error(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    if args.temperature is not None and args.temperature <= 0:
        parser.error(f"--temperature must be > 0 (use --greedy for greedy decoding), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 0:
        parser.error(f"--top-k must be >= 0 (0: no limit), got {args.top_k}")
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)


def _load(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[nn.Module, Any]:
    try:
        model, tokenizer, _ = load_for_generation(args.adapter, args.base_model, args.device)
    except (FileNotFoundError, ValueError, OSError) as error:
        parser.error(str(error))
    return model, tokenizer


def _start(args: argparse.Namespace) -> list[dict[str, str]]:
    return [{"role": "system", "content": args.system}] if args.system else []


def generate_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-peft generate", description="Answer prompts with an adapted causal LM (streamed)."
    )
    parser.add_argument("prompts", nargs="+", help="one or more prompts (each answered on its own)")
    _common(parser, adapter_required=False)
    _sampling(parser)
    parser.add_argument("--no-stream", action="store_true", help="print each answer when it is complete")
    args = parser.parse_args(list(argv))
    _check_sampling(parser, args)
    model, tokenizer = _load(parser, args)
    kwargs = generation_kwargs(args, tokenizer)
    for prompt in args.prompts:
        try:
            inputs = encode(tokenizer, [*_start(args), {"role": "user", "content": prompt}], args.raw)
        except ValueError as error:
            parser.error(str(error))
        text = respond(model, tokenizer, inputs, kwargs, stream=not args.no_stream)
        if args.no_stream:
            print(text, flush=True)
    return 0


def chat_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-peft chat",
        description="Chat with an adapted causal LM: one user message per input line; /reset forgets the "
        "conversation, /exit (or end of input) stops.",
    )
    _common(parser, adapter_required=False)
    _sampling(parser)
    args = parser.parse_args(list(argv))
    _check_sampling(parser, args)
    model, tokenizer = _load(parser, args)
    kwargs = generation_kwargs(args, tokenizer)
    interactive = sys.stdin.isatty()
    messages = _start(args)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = _start(args)
            print("(conversation reset)", file=sys.stderr, flush=True)
            continue
        messages.append({"role": "user", "content": text})
        try:
            inputs = encode(tokenizer, messages, args.raw)
        except ValueError as error:
            parser.error(str(error))
        answer = respond(model, tokenizer, inputs, kwargs, stream=True)
        messages.append({"role": "assistant", "content": answer})


def merge_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-peft merge",
        description="Fold an adapter into its base model and write a plain transformers folder (model + "
        "tokenizer) that AutoModelForCausalLM.from_pretrained loads.",
    )
    parser.add_argument("output", help="folder to write (must be absent or empty, unless --overwrite)")
    _common(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--device", default="cpu", help="where to merge (default: cpu)")
    args = parser.parse_args(list(argv))
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        parser.error(f"output {str(out)!r} exists and is not an empty folder; pass --overwrite to replace it")
    model, tokenizer = _load(parser, args)
    from lightning_peft.files.atomic import replace_folder
    from lightning_peft.ops.merging import merge_and_unload

    try:
        merged = merge_and_unload(model)
    except TypeError as error:  # a method that cannot be merged (adapters, prefix or prompt tuning)
        parser.error(f"--adapter {args.adapter}: {error}")
    if out.is_dir():
        shutil.rmtree(out)  # --overwrite: no stale shard of an earlier model may stay beside the new one
    elif out.exists():
        out.unlink()

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)  # type: ignore[operator]
        tokenizer.save_pretrained(tmp)

    replace_folder(out, write)
    print(f"merged model written to {out}")
    return 0


def export_check_main(argv: Sequence[str]) -> int:
    from lightning_peft.files.serving import ENGINE_RULES, check_adapter_serving

    parser = argparse.ArgumentParser(
        prog="lightning-peft export-check",
        description="Say whether serving engines load an adapter as it is or it must be merged first "
        "(exit status 1 when it does not serve as is on every engine named).",
    )
    parser.add_argument("--adapter", required=True, help="adapter folder (or adapter-only .ckpt)")
    parser.add_argument(
        "--engine",
        action="append",
        choices=[*sorted(ENGINE_RULES), "all"],
        default=None,
        help="engine to check (repeatable; default: vllm)",
    )
    parser.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    args = parser.parse_args(list(argv))
    engines = args.engine or ["vllm"]
    engines = sorted(ENGINE_RULES) if "all" in engines else list(dict.fromkeys(engines))
    try:
        verdicts = check_adapter_serving(args.adapter, engines)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    if args.json:
        print(json.dumps([v.to_dict() for v in verdicts], indent=2))
    else:
        print("\n".join(str(v) for v in verdicts))
    return 0 if all(v.serves_as_is for v in verdicts) else 1


#: the commands this module adds to ``lightning-peft`` (dispatched by lightning_peft/cli.py)
LLM_COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "generate": generate_main,
    "chat": chat_main,
    "merge": merge_main,
    "export-check": export_check_main,
}

LLM_HELP = """  generate        answer prompts with an adapted causal LM, streamed (lightning-peft generate --help)
  chat            chat with an adapted causal LM over stdin (lightning-peft chat --help)
  merge           fold an adapter into its base and write a transformers folder (lightning-peft merge --help)
  export-check    will vLLM / llama.cpp serve the adapter as is? (lightning-peft export-check --help)
"""
