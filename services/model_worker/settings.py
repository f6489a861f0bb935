"""Settings of a model worker (env prefix ``AXL_``): which checkpoint and specialist it serves, how it batches."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from axl_mesh.registry_schemas import NAME_PATTERN
from axl_mesh.settings import ServiceSettings
from axl_model.specialists import get_specialist


class Settings(ServiceSettings):
    """One worker serves one checkpoint as one specialist; ``AXL_REGISTRY_URL=""`` runs it standalone.

    ``AXL_REGISTRY_SECRET`` (the mesh secret) is required: the worker announces itself with it and refuses
    internal calls that do not carry it. It registers ``advertised_url()`` (``AXL_ADVERTISE_URL`` /
    ``AXL_ADVERTISE_HOST``, see ``axl_mesh.advertise``), the URL the gateway calls it at."""

    port: int = Field(default=8901, ge=0, le=65535)
    # Required, standalone too: /internal/v1/* answers only calls that carry it (the worker has no other auth).
    registry_secret: SecretStr
    # "pinned": serve `checkpoint` as `specialist` (a specialist worker). "pool": serve any model of the model store
    # on demand (services/model_worker/pool.py): load on request, keep the most recently used within
    # pool_memory_budget_mb, unload idle ones; what it holds is registered model by model.
    worker_mode: Literal["pinned", "pool"] = Field(default="pinned", description="one pinned model, or a pool")
    checkpoint: Path | None = Field(
        default=None,
        description="checkpoint folder (model.safetensors + config.json); required unless worker_mode is pool",
    )
    checkpoint_wait_seconds: float = Field(
        default=0.0, ge=0, description="wait this long for a missing checkpoint to appear (a bootstrap training)"
    )
    specialist: str = "coder"
    model_id: str | None = Field(default=None, description='the name clients ask for; default "axl-<specialist>"')
    max_batch: int = Field(default=8, ge=1, le=256, description="sequences decoded together (KV-cache rows)")
    max_queue: int = Field(default=64, ge=0, description="requests waiting for a row; one more gets a 503")
    # Decode steps are small matrix-vector products: a second thread costs more in synchronisation than it
    # gains, and on a shared machine it collides with the other workers (measured: 1 thread ~15x faster under load).
    num_threads: int = Field(default=1, ge=1, description="torch intra-op threads for this worker")
    # float16 halves the weight bytes each decode step reads: ~1.3x the tokens/s of float32 for one stream on a CPU
    # with F16C, but ~0.6x at 8 streams (CPU half matmuls are slow); logits within ~1e-2. float32 is exact.
    # int8: weight-only int8 linear layers (per-channel scales, activations float32, rounded to bfloat16 at each
    # decode matmul; axl_model.quantize); a quarter of the weight bytes, its bits/byte cost is in the README.
    # A Q8_0 axl-multiscale .gguf serves its Q8_0 matrices as int8 whatever this says.
    dtype: Literal["float32", "float16", "bfloat16", "int8"] = Field(default="float32", description="serving precision")
    # A long prompt read in one go stalls every other stream for its whole prefill (a 4 KB window: a second or
    # more); in chunks, the others get a token between two chunks. Exact either way (MultiScaleTransformer.extend).
    prefill_chunk_tokens: int = Field(
        default=256,
        ge=0,
        multiple_of=4,
        description="read prompts in chunks of this many tokens between decode "
        "steps (a multiple of 4); 0: each prompt in one go",
    )
    # The prompt prefix cache (axl_model.prefix_cache): each prompt's model state is kept after its prefill, and a
    # prompt sharing a kept prompt's beginning (an editor's next keystroke) restores it and reads only the rest; exact.
    # One prompt's state in float32: ~17 MiB per 1,000 bytes (micro, micro-long), 74 MiB for a full 4,096-byte
    # window; prompts that share a prefix share its memory. 0: off.
    prefix_cache_mb: float = Field(
        default=256.0, ge=0, description="memory for the states of recent prompts (prefix reuse); 0: off"
    )
    # The compiled static-shape decode step (axl_model.compiled: inductor's C++ backend, one graph per step kind),
    # compiled while the model loads (/readyz waits for it); the README's speed section has its figures. Where it
    # cannot compile (no C++ compiler) the worker decodes eagerly and says so once in the log.
    compile: bool = Field(default=False, description="decode with the compiled static-shape step (AXL_COMPILE=1)")
    drain_seconds: float = Field(default=30.0, ge=0, description="on SIGTERM, how long in-flight requests may finish")
    heartbeat_seconds: float | None = Field(default=None, gt=0, description="default: a third of the registry TTL")
    retry_after_seconds: int = Field(default=1, ge=0, description="Retry-After of the 503 answers")
    stalled_reader_seconds: float = Field(
        default=30.0, gt=0, description="a request whose stream nobody reads for this long is cancelled (row freed)"
    )

    # --- pool mode (AXL_WORKER_MODE=pool) ---
    # What loaded models may take together: weights at the serving dtype plus the KV cache of max_batch rows over
    # the full window (services/model_worker/pool.py, estimate_serving_bytes). A load that does not fit unloads
    # the least recently used idle models first; if it still does not fit, it is a 503 pool_full.
    pool_memory_budget_mb: float = Field(default=4096.0, gt=0, description="memory budget of the loaded models")
    pool_idle_unload_seconds: float = Field(
        default=600.0, ge=0, description="a model not asked for this long is unloaded; 0: kept until evicted"
    )
    pool_load_timeout_seconds: float = Field(default=120.0, gt=0, description="bound on loading one model")
    # The model store (the folder of the trainer's checkpoints + manifest.json): a shared volume or network
    # filesystem, the same path the gateway and trainer use. Default: data_dir/models.
    data_dir: Path = Field(default=Path("data"), description="the mesh's data folder")
    model_store_dir: Path | None = None
    # Or, on a host that does not share that volume: the gateway's URL (http://api-gateway:8880). A model the local
    # store lacks is copied from it (mesh secret, every file's SHA-256 checked) into model_store_dir, then loaded.
    model_store_url: str | None = Field(default=None, description="copy missing models from this gateway")

    @model_validator(mode="after")
    def _checkpoint_unless_pool(self) -> Settings:
        if self.worker_mode == "pinned" and self.checkpoint is None:
            raise ValueError("AXL_CHECKPOINT is required (or AXL_WORKER_MODE=pool to serve the model store)")
        return self

    @property
    def pool(self) -> bool:
        return self.worker_mode == "pool"

    @property
    def resolved_model_store_dir(self) -> Path:
        return self.model_store_dir or self.data_dir / "models"

    @field_validator("specialist")
    @classmethod
    def _known_specialist(cls, value: str) -> str:
        get_specialist(value)  # ValueError naming the valid ones
        return value

    @field_validator("model_id")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and not re.match(NAME_PATTERN, value):
            raise ValueError(f"model_id must match {NAME_PATTERN}, got {value!r}")
        return value

    @property
    def served_model_id(self) -> str:
        """The name clients ask for (a pool's own name: what its registry record and logs say)."""
        return self.model_id or ("axl-pool" if self.pool else f"axl-{self.specialist}")

    @property
    def threads(self) -> int:
        return self.num_threads

    @property
    def standalone(self) -> bool:
        """No registry configured: serve without announcing (tests, benches, a single local worker)."""
        return not self.registry_url.strip()
