"""Settings of the quantizer worker (env prefix ``AXL_``)."""

from __future__ import annotations

from pydantic import Field

from axl_mesh.jobs import JobsSettings


class Settings(JobsSettings):
    """The quantizer serves ``/healthz`` and ``/metrics`` on :8961."""

    port: int = Field(default=8961, ge=0, le=65535)
    # Which GGUF kinds each type is produced as: "llama" (llama.cpp/Ollama, fine scale only) and/or "multiscale"
    # (the full model, for our model worker).
    gguf_kinds: str = Field(default="llama,multiscale", pattern=r"^(llama|multiscale)(,(llama|multiscale))?$")

    def kinds(self) -> list[str]:
        return [k for k in self.gguf_kinds.split(",") if k]
