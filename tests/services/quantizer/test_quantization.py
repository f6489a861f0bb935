"""Quantization jobs over HTTP: GGUF files of a model-store model, downloadable, loadable by llama.cpp."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from axl_mesh.model_store import ModelStore
from tests.checkpoints import make_tiny_checkpoint
from tests.services.trainer_worker.mesh import JobMesh, wait_for


def _wait_done(url: str, job_id: str) -> dict:
    def ended() -> dict | None:
        job = httpx.get(f"{url}/v1/quantization/jobs/{job_id}", timeout=10).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(ended, 240, f"quantization job {job_id}")


def test_quantize_a_store_model_and_load_it_in_llama_cpp(redis_url, tmp_path, start_service) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    mesh = JobMesh(redis_url, tmp_path, start_service, AXL_GGUF_KINDS="llama")
    store = ModelStore(tmp_path / "data" / "models")
    store.add("base-tiny", make_tiny_checkpoint(tmp_path / "ckpt"), move=False, base="tiny", specialist="coder")
    url = mesh.gateway.url

    bad = httpx.post(f"{url}/v1/quantization/jobs", json={"model": "nope", "types": ["q8_0"]}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
    bad_type = httpx.post(f"{url}/v1/quantization/jobs", json={"model": "base-tiny", "types": ["q3"]}, timeout=10)
    assert bad_type.status_code == 400 and "types" in bad_type.json()["error"]["param"]

    created = httpx.post(f"{url}/v1/quantization/jobs", json={"model": "base-tiny", "types": ["f16", "q8_0"]},
                         timeout=10).json()
    assert created["status"] == "queued"
    mesh.start_quantizer()
    job = _wait_done(url, created["id"])
    assert job["status"] == "succeeded", job["error"]
    assert sorted(o["type"] for o in job["outputs"]) == ["f16", "q8_0"]
    assert created["id"] in [j["id"] for j in httpx.get(f"{url}/v1/quantization/jobs", timeout=10).json()["data"]]

    q8 = next(o for o in job["outputs"] if o["type"] == "q8_0")
    download = httpx.get(url + q8["url"], timeout=30)
    assert download.status_code == 200 and len(download.content) == q8["bytes"]
    assert download.content[:4] == b"GGUF"
    assert httpx.get(f"{url}/v1/quantization/jobs/{created['id']}/files/..%2Fmanifest.json").status_code == 404
    path = Path(tmp_path / "model.gguf")
    path.write_bytes(download.content)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False)
    assert llm.tokenize(b"ab", add_bos=True) == [256, ord("a"), ord("b")]
    out = llm("def f(", max_tokens=4, temperature=0)
    assert out["choices"][0]["text"] is not None
    assert "llama-q8_0" in store.get("base-tiny")["gguf"]


def test_fine_tuning_with_quantize_runs_the_quantization_after_training(redis_url, tmp_path, start_service) -> None:
    mesh = JobMesh(redis_url, tmp_path, start_service, AXL_GGUF_KINDS="multiscale")
    client = mesh.client()
    file_id = mesh.upload(client)
    ok = client.fine_tuning.jobs.create(model="tiny", training_file=file_id, hyperparameters={"max_steps": 5},
                                        extra_body={"quantize": ["q8_0"]})
    cancelled = client.fine_tuning.jobs.create(model="tiny", training_file=file_id, hyperparameters={"max_steps": 5},
                                               extra_body={"quantize": ["f16"]})
    client.fine_tuning.jobs.cancel(cancelled.id)
    mesh.start_trainer()
    mesh.start_quantizer()
    url = mesh.gateway.url
    done = _wait_done(url, ok.quantization_jobs[0])
    assert done["status"] == "succeeded", done["error"]
    assert done["model"] == client.fine_tuning.jobs.retrieve(ok.id).fine_tuned_model
    assert done["outputs"][0]["details"]["kind"] == "multiscale"
    skipped = _wait_done(url, cancelled.quantization_jobs[0])
    assert skipped["status"] == "cancelled" and skipped["error"]["code"] == "training_not_succeeded"
