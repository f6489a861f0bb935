"""Settings of the quantizer worker (env prefix ``AXL_``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from axl_mesh.jobs import JobsSettings

if TYPE_CHECKING:
    from axl_model.export.formats import ExportKind


class Settings(JobsSettings):
    """The quantizer serves ``/healthz`` and ``/metrics`` on :8961."""

    port: int = Field(default=8961, ge=0, le=65535)
    # Which GGUF kinds each type is produced as: "llama" (llama.cpp/Ollama, fine scale only) and/or "multiscale"
    # (the full model, for our model worker).
    gguf_kinds: str = Field(default="llama,multiscale", pattern=r"^(llama|multiscale)(,(llama|multiscale))?$")

    def kinds(self) -> list[ExportKind]:
        """The kinds of ``gguf_kinds`` in its order (its pattern admits these two names only)."""
        names: dict[str, ExportKind] = {"llama": "llama", "multiscale": "multiscale"}
        return [names[k] for k in self.gguf_kinds.split(",") if k]
