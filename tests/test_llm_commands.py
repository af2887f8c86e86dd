"""lightning-peft generate / chat / merge / export-check on a tiny chat Llama saved to a folder."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from llm_tiny import save_tiny_chat_llama, tiny_tokenizer

from lightning_peft import IA3, Adapter, DoRA, LoRA, PEFTMethod, apply_peft, save_adapter
from lightning_peft.cli import main
from lightning_peft.cli.llm import encode
from lightning_peft.files.serving import check_serving

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_chat_llama(tmp_path_factory.mktemp("tiny") / "base")


def adapted(base: Path, method: PEFTMethod, folder: Path | None = None) -> torch.nn.Module:
    """The base with ``method`` attached and its tensors moved off their initial values (B = 0 is a no-op)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    apply_peft(model, method)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    if folder is not None:
        save_adapter(model, folder)
    return model


def greedy(model: torch.nn.Module, ids: torch.Tensor, n: int = 8) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
        )
    return out[0, ids.shape[1] :]


def chat_ids(messages: list[dict[str, str]]) -> torch.Tensor:
    return encode(tiny_tokenizer(), messages, raw=False)["input_ids"]


def test_merge_writes_a_folder_automodel_loads_with_the_same_outputs(base: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = adapted(base, LoRA(r=4, target_modules=ATTENTION), tmp_path / "a")
    assert main(["merge", "--adapter", str(tmp_path / "a"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = chat_ids([{"role": "user", "content": "hello how are you"}])
    assert torch.equal(greedy(model, ids), greedy(merged, ids))
    with torch.no_grad():  # in float64, so that only the merge's own rounding (fp32 weights) remains
        expected, got = model.double()(input_ids=ids).logits, merged.double()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base).double()(input_ids=ids).logits
    assert (expected - got).abs().max() < 1e-5
    assert (expected - plain).abs().max() > 1e-2  # the adapter changes the outputs: the merge carried it
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == tiny_tokenizer().chat_template


def test_merge_refuses_an_unmergeable_adapter_and_a_used_folder(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapted(base, Adapter(target_modules=["down_proj"], bottleneck_size=4), tmp_path / "a")
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--adapter", str(tmp_path / "a"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "cannot be merged" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit):
        main(["merge", "--adapter", str(tmp_path / "a"), str(tmp_path / "used")])
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "used" / "keep.txt").exists()


def test_generate_streams_the_adapted_models_greedy_answer(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = adapted(base, LoRA(r=4, target_modules=ATTENTION), tmp_path / "a")
    prompt = "what is the capital of france"
    tokenizer = tiny_tokenizer()
    ids = chat_ids([{"role": "user", "content": prompt}])
    expected = tokenizer.decode(greedy(model, ids, 10), skip_special_tokens=True)
    assert main(["generate", "--adapter", str(tmp_path / "a"), "--max-new-tokens", "10", prompt]) == 0
    out = capsys.readouterr().out
    assert out.strip() == expected.strip() and expected.strip()
    raw_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    raw_expected = tokenizer.decode(greedy(model, raw_ids, 10), skip_special_tokens=True)
    main(
        [
            "generate",
            "--adapter",
            str(tmp_path / "a"),
            "--raw",
            "--max-new-tokens",
            "10",
            "--no-stream",
            prompt,
        ]
    )
    assert capsys.readouterr().out.strip() == raw_expected.strip()


def test_generate_samples_reproducibly_with_a_seed(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapted(base, LoRA(r=4, target_modules=ATTENTION), tmp_path / "a")
    args = [
        "generate",
        "--adapter",
        str(tmp_path / "a"),
        "--do-sample",
        "--temperature",
        "1.5",
        "--top-k",
        "0",
    ]
    outs = []
    for seed in ("1", "1", "2"):
        main([*args, "--seed", seed, "--max-new-tokens", "12", "--no-stream", "hello"])
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] != outs[2]


def test_generate_rejects_bad_options(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapted(base, LoRA(r=4, target_modules=ATTENTION), tmp_path / "a")
    for bad, words in ((["--temperature", "0"], "--temperature must be > 0"), (["--top-p", "2"], "--top-p")):
        with pytest.raises(SystemExit):
            main(["generate", "--adapter", str(tmp_path / "a"), *bad, "hi"])
        assert words in capsys.readouterr().err


def test_chat_keeps_the_conversation_and_resets(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = adapted(base, LoRA(r=4, target_modules=ATTENTION), tmp_path / "a")
    tokenizer = tiny_tokenizer()

    def answer(messages: list[dict[str, str]]) -> str:
        return tokenizer.decode(greedy(model, chat_ids(messages), 6), skip_special_tokens=True)

    first = answer([{"role": "user", "content": "hello"}])
    history = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "the film"},
    ]
    second = answer(history)
    alone = answer([{"role": "user", "content": "the film"}])
    assert second != alone  # the test can tell whether the history was kept
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nthe film\n/reset\nthe film\n/exit\nnever read\n"))
    assert main(["chat", "--adapter", str(tmp_path / "a"), "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == f"{first}\n{second}\n{alone}\n"


def test_export_check_command_verdicts_and_exit_codes(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapted(base, LoRA(r=8, target_modules=ATTENTION), tmp_path / "lora")
    assert main(["export-check", "--adapter", str(tmp_path / "lora"), "--engine", "all"]) == 0
    out = capsys.readouterr().out
    assert "vllm: SERVES AS-IS" in out and "llama.cpp: SERVES AS-IS" in out and "--max-lora-rank 8" in out
    adapted(base, DoRA(r=8, target_modules=ATTENTION), tmp_path / "dora")
    assert main(["export-check", "--adapter", str(tmp_path / "dora"), "--json"]) == 1
    (verdict,) = json.loads(capsys.readouterr().out)
    assert verdict["verdict"] == "merge first" and "magnitude" in verdict["reasons"][0]
    adapted(base, Adapter(target_modules=["down_proj"], bottleneck_size=4), tmp_path / "bottleneck")
    assert main(["export-check", "--adapter", str(tmp_path / "bottleneck")]) == 1
    assert "UNSUPPORTED" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("method", "engine", "verdict", "words"),
    [
        (LoRA(r=16, target_modules=ATTENTION), "vllm", "serves as-is", ""),
        (LoRA(r=4, target_modules=ATTENTION), "vllm", "serves as-is", ""),
        (LoRA(r=1024, target_modules=ATTENTION), "vllm", "merge first", "exceeds"),
        (LoRA(r=1024, target_modules=ATTENTION), "llama.cpp", "serves as-is", ""),
        (LoRA(r=8, target_modules=ATTENTION, modules_to_save=["lm_head"]), "vllm", "merge first", "modules_to_save"),
        (LoRA(r=8, target_modules=ATTENTION, modules_to_save=["lm_head"]), "llama.cpp", "merge first", "modules"),
        (LoRA(r=8, target_modules=ATTENTION, rank_pattern={"q_proj": 16}), "vllm", "merge first", "rank_pattern"),
        (LoRA(r=8, target_modules=ATTENTION, rank_pattern={"q_proj": 16}), "llama.cpp", "serves as-is", ""),
        (LoRA(r=8, target_modules=ATTENTION, lora_bias=True), "vllm", "merge first", "lora_bias"),
        (DoRA(r=8, target_modules=ATTENTION), "vllm", "merge first", "DoRA"),
        (IA3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), "vllm",
         "merge first", "only LoRA"),
        (Adapter(target_modules=["down_proj"], bottleneck_size=4), "vllm", "unsupported", "only LoRA"),
    ],
)  # fmt: skip
def test_serving_rules(method: PEFTMethod, engine: str, verdict: str, words: str) -> None:
    result = check_serving([method], engine=engine)
    assert result.verdict == verdict
    assert words in " ".join(result.reasons)
    if verdict == "serves as-is" and engine == "vllm":
        setting = {4: 8, 16: 16}[method.r]  # the smallest allowed --max-lora-rank >= r
        assert f"--max-lora-rank {setting}" in result.advice[0]


def test_serving_rules_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="engine='tgi' is not known; known engines"):
        check_serving([LoRA(r=8)], engine="tgi")
    with pytest.raises(ValueError, match="methods is empty"):
        check_serving([])
