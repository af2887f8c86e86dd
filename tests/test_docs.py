"""The documentation cannot rot: every ```python block in README.md and docs/**/*.md runs, and the site builds.

Each file's blocks run in order in one namespace (a later block may use names from an earlier one), in a
fresh temporary working directory, offline. Tracebacks point at the Markdown file and line. Code that cannot
run here (GPU, several processes, network) is fenced as ```bash or ```text instead.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


def doc_files() -> list[Path]:
    files = [ROOT / "README.md"] if (ROOT / "README.md").is_file() else []
    return files + sorted(DOCS.rglob("*.md"))


def code_blocks(path: Path, language: str = "python") -> list[tuple[int, str]]:
    """(first line number, source) of every fenced block whose info string starts with ``language``."""
    blocks: list[tuple[int, str]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, ticks = opening["indent"], opening["ticks"]
        words = opening["info"].split()
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = FENCE.match(lines[j])
            if closing and closing["ticks"][0] == ticks[0] and len(closing["ticks"]) >= len(ticks):
                if not closing["info"].strip():
                    break
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        else:
            raise AssertionError(f"{path}:{i + 1}: code fence opened here is never closed")
        if words and words[0] == language:
            blocks.append((i + 2, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


FILES_WITH_CODE = [p for p in doc_files() if code_blocks(p)]


def test_doc_blocks_are_found() -> None:
    # guards the collector itself: the README and the quick start must always carry runnable examples
    names = {_relative(p) for p in FILES_WITH_CODE}
    assert {"README.md", "docs/quickstart.md"} <= names, names


def test_fence_parser(tmp_path: Path) -> None:
    sample = tmp_path / "sample.md"
    sample.write_text(
        "a\n```python\nx = 1\n```\n```bash\nls\n```\n  ```python\n  y = x + 1\n  ```\n"
        "````text\n```python\nnot code\n```\n````\n"
    )
    assert code_blocks(sample) == [(3, "x = 1\n"), (9, "y = x + 1\n")]


@pytest.fixture
def isolated_registry() -> Iterator[None]:
    from lightning_peft.methods import registry

    saved = dict(registry._REGISTRY)
    yield
    # a page may register a demonstration method; other tests must not see it
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


@pytest.mark.parametrize("path", FILES_WITH_CODE, ids=_relative)
def test_python_blocks_run(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_registry: None
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.chdir(tmp_path)
    # the blocks run as the body of a registered module, so that classes they define can be pickled
    module_name = "__doc_" + re.sub(r"\W", "_", _relative(path))
    module = types.ModuleType(module_name)
    monkeypatch.setitem(sys.modules, module_name, module)
    namespace = module.__dict__
    for line, source in code_blocks(path):
        # pad so that line numbers in tracebacks are the Markdown file's own
        code = compile("\n" * (line - 1) + source, str(path), "exec")
        try:
            exec(code, namespace)
        except Exception as error:
            raise AssertionError(
                f"{_relative(path)}: the python block starting at line {line} failed"
            ) from error


def test_api_page_lists_every_public_name() -> None:
    import lightning_peft

    text = (DOCS / "api.md").read_text(encoding="utf-8")
    missing = [name for name in lightning_peft.__all__ if f"`{name}" not in text]
    assert not missing, f"docs/api.md does not document {missing}"


def test_every_page_is_in_the_nav() -> None:
    nav_text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = [str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")]
    missing = [p for p in pages if p not in nav_text]
    assert not missing, f"pages missing from the mkdocs.yml nav: {missing}"


def test_documented_default_targets() -> None:
    # rows of the default-target tables of docs/methods/{lora,ia3,adapters}.md; update them when this fails
    from lightning_peft.core import default_targets as hf_targets
    from lightning_peft.core.default_targets import BERT_FFN_OUT
    from lightning_peft.methods import adapter

    llama_like = ("llama", "mistral", "qwen2", "gemma", "gemma2", "granite", "olmo")
    lora_rows = {
        **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "albert"), ["query", "value"]),
        "distilbert": ["q_lin", "v_lin"],
        "deberta-v2": ["query_proj", "value_proj"],
        **dict.fromkeys(("gpt2", "gpt_bigcode"), ["c_attn"]),
        **dict.fromkeys((*llama_like, "mixtral", "qwen2_moe", "qwen3"), ["q_proj", "v_proj"]),
        "phi3": ["qkv_proj"],
        **dict.fromkeys(("gpt_neox", "falcon", "bloom"), ["query_key_value"]),
        **dict.fromkeys(
            ("opt", "gptj", "gpt_neo", "phi", "bart", "mbart", "marian", "pegasus"), ["q_proj", "v_proj"]
        ),
        **dict.fromkeys(("t5", "mt5", "umt5", "longt5"), ["q", "v"]),
    }
    assert {k: hf_targets.LORA_TARGETS[k] for k in lora_rows} == lora_rows
    ia3_rows = {
        "bert": (["key", "value", BERT_FFN_OUT], [BERT_FFN_OUT]),
        "albert": (["key", "value", "ffn_output"], ["ffn_output"]),
        "deberta-v2": (["key_proj", "value_proj", BERT_FFN_OUT], [BERT_FFN_OUT]),
        "distilbert": (["k_lin", "v_lin", "ffn.lin2"], ["ffn.lin2"]),
        "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
        **dict.fromkeys(llama_like, (["k_proj", "v_proj", "down_proj"], ["down_proj"])),
        **dict.fromkeys(("mixtral", "qwen2_moe"), (["k_proj", "v_proj"], [])),
        "phi3": (["qkv_proj", "down_proj"], ["down_proj"]),
        **dict.fromkeys(
            ("gpt_neox", "falcon", "bloom"), (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"])
        ),
        **dict.fromkeys(
            ("opt", "bart", "mbart", "marian", "pegasus"), (["k_proj", "v_proj", "fc2"], ["fc2"])
        ),
        **dict.fromkeys(("t5", "mt5", "umt5"), (["k", "v", "wo"], ["wo"])),
    }
    for model_type, (targets, feedforward) in ia3_rows.items():
        assert hf_targets.IA3_TARGETS[model_type] == targets, model_type
        assert hf_targets.IA3_FEEDFORWARD[model_type] == feedforward, model_type
    bert_like = (r"(.*\.)?attention\.output\.dense", r"(.*\.)?layer\.\d+\.output\.dense")
    adapter_rows = {
        **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "deberta-v2"), bert_like),
        "albert": (r"(.*\.)?attention\.dense", r"(.*\.)?ffn_output"),
        "distilbert": (r"(.*\.)?attention\.out_lin", r"(.*\.)?ffn\.lin2"),
        "gpt2": ("attn.c_proj", "mlp.c_proj"),
        **dict.fromkeys((*llama_like, "phi3"), ("self_attn.o_proj", "mlp.down_proj")),
        "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
        **dict.fromkeys(("falcon", "bloom"), ("self_attention.dense", "mlp.dense_4h_to_h")),
        **dict.fromkeys(("opt", "bart", "mbart", "marian", "pegasus"), ("self_attn.out_proj", "fc2")),
        **dict.fromkeys(("t5", "mt5", "umt5"), ("SelfAttention.o", "DenseReluDense.wo")),
    }
    assert {k: tuple(hf_targets.ADAPTER_PLACEMENT[k]) for k in adapter_rows} == adapter_rows
    assert "mixtral" not in hf_targets.ADAPTER_PLACEMENT and "qwen2_moe" not in hf_targets.ADAPTER_PLACEMENT
    assert adapter.DEFAULT_REDUCTION_FACTOR == 16
    assert sorted(adapter.ACTIVATIONS) == sorted(
        ["relu", "gelu", "gelu_tanh", "silu", "swish", "tanh", "sigmoid", "leaky_relu"]
    )


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    # no -q: with mkdocs 1.6 it hides the warnings from --strict as well, and a broken site "passes"
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    result = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "methods" / "lora" / "index.html").is_file()


def test_mkdocs_strict_catches_broken_links(tmp_path: Path) -> None:
    # the validation settings in mkdocs.yml are what makes a dead link or anchor fail the build
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    with (tmp_path / "docs" / "index.md").open("a", encoding="utf-8") as f:
        f.write("\nSee [nowhere](pitfalls.md#no-such-section).\n")
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-section" in result.stderr
