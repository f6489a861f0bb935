"""The worker's prompt prefix cache (AXL_PREFIX_CACHE_MB): an editor's requests, the same prompt with its end changed,
reuse the kept prefix and give the tokens a worker without the cache gives (beside another running request, read in
chunks or in one go, prompts fitted into the window, a file longer than the window growing at its end); the metrics
count hits, misses and reused tokens."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from axl_model.prompt_fit import fit_text, generation_reserve
from axl_model.tokenizer import ByteTokenizer
from tests.services.model_worker.conftest import GENERATE, MESH_AUTH, WORKER, metric_value, wait_ready, worker_env
from tests.support import ServiceProcess

BASE = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n"  # 71 bytes
EDITS = ["x = fib", "x = fib(1", "print(fib(10))", "", "y", "def g():\n    return fib(3)"]  # within the 128-byte window


def _generate(url: str, prompt: str, **body: object) -> dict:
    answer = httpx.post(
        url + GENERATE,
        headers=MESH_AUTH,
        json={"prompt": prompt, "max_tokens": 12, "temperature": 0.0, **body},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.fixture(scope="module", params=["8", "256"], ids=["chunks-of-8", "one-go"])
def workers(request, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(a worker with the prefix cache, one without), both reading prompts in chunks of the given size."""
    logs = tmp_path_factory.mktemp("prefix")
    common = {"AXL_MAX_BATCH": "3", "AXL_PREFILL_CHUNK_TOKENS": request.param}
    cached_env = worker_env(tiny_checkpoint, AXL_PREFIX_CACHE_MB="64", **common)
    cold_env = worker_env(tiny_checkpoint, AXL_PREFIX_CACHE_MB="0", **common)
    with (
        ServiceProcess(WORKER, cached_env, log_path=logs / "cached.log") as cached,
        ServiceProcess(WORKER, cold_env, log_path=logs / "cold.log") as cold,
    ):
        wait_ready(cached.url)
        wait_ready(cold.url)
        yield cached.url, cold.url


def test_edited_prompts_reuse_the_prefix_and_give_the_cold_tokens(workers: tuple[str, str]) -> None:
    cached, cold = workers
    background = threading.Thread(target=_generate, args=(cached, "import os\n"), kwargs={"max_tokens": 100})
    background.start()  # another row decodes in the batch meanwhile
    try:
        for edit in EDITS:
            assert _generate(cached, BASE + edit)["text"] == _generate(cold, BASE + edit)["text"], edit
    finally:
        background.join()
    hits = metric_value(cached, "axl_worker_prefix_cache_lookups_total", 'result="hit"')
    reused = metric_value(cached, "axl_worker_prefix_cache_reused_tokens_total")
    assert hits >= len(EDITS) - 1 and reused >= (len(EDITS) - 1) * (len(BASE) // 4 * 4 - 4)  # BOS: +1 token
    assert metric_value(cached, "axl_worker_prefix_cache_lookups_total", 'result="miss"') >= 1
    assert 0 < metric_value(cached, "axl_worker_prefix_cache_bytes") <= 64 << 20
    assert metric_value(cold, "axl_worker_prefix_cache_lookups_total", 'result="hit"') == 0


def test_prompts_longer_than_the_window_are_fitted_and_decode_as_without_the_cache(workers: tuple[str, str]) -> None:
    cached, cold = workers
    long_base = BASE * 7  # ~500 bytes, a 128-byte window: fitted to its end
    for edit in ("", "a = 1", "b = fibonacci(2)"):
        mine, theirs = (_generate(url, long_base + edit, truncate=True) for url in (cached, cold))
        assert mine["prompt_truncated"] > 0 and mine["prompt_truncated"] == theirs["prompt_truncated"]
        assert mine["text"] == theirs["text"]


def test_a_file_longer_than_the_window_typed_at_its_end_reuses_its_kept_start(workers: tuple[str, str]) -> None:
    """The fitted prompt's head goes in whole blocks, so while the file grows within a block each request keeps the
    start of the one before, and the cache restores it (a cut moving by the bytes typed would never hit)."""
    cached, cold = workers
    long_base, typed = BASE * 7, "result = fib(10) + fib(2)"
    files = [long_base + typed[:n] for n in range(0, len(typed), 3)]  # 3 bytes typed between requests
    budget = 128 - generation_reserve(12, 128)  # the tiny model's window less the answer's room (max_tokens 12)
    kept = [fit_text(ByteTokenizer(), file, budget).text for file in files]
    starts = [len(file) - len(text) for file, text in zip(files, kept)]
    same_start = sum(a == b for a, b in zip(starts, starts[1:]))
    assert same_start >= len(files) - 3  # the pattern this test is about: most requests keep the start
    hits_before = metric_value(cached, "axl_worker_prefix_cache_lookups_total", 'result="hit"')
    reused_before = metric_value(cached, "axl_worker_prefix_cache_reused_tokens_total")
    for file, start in zip(files, starts):
        mine, theirs = (_generate(url, file, truncate=True) for url in (cached, cold))
        assert mine["prompt_truncated"] == theirs["prompt_truncated"] == start  # ASCII: bytes are characters
        assert mine["text"] == theirs["text"], file
    hits = metric_value(cached, "axl_worker_prefix_cache_lookups_total", 'result="hit"') - hits_before
    reused = metric_value(cached, "axl_worker_prefix_cache_reused_tokens_total") - reused_before
    assert hits >= same_start and reused >= same_start * (min(map(len, kept)) // 4 * 4 - 4)
