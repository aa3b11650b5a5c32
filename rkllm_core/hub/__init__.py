"""Model downloads from the Hugging Face Hub (``rkllm pull``), through ``huggingface_hub``.

* :func:`pull` downloads a model into its own folder under a model directory,
  checked against the Hub's sha256 before it becomes visible
  (:mod:`rkllm_core.hub.download`);
* :func:`remove_model` deletes a pulled model (:mod:`rkllm_core.hub.store`);
* :func:`source_of` tells where a pulled model came from
  (:mod:`rkllm_core.hub.manifest`, standard library only).

``huggingface_hub`` (the ``hub`` extra) is imported on the first pull only.
"""

from __future__ import annotations

from .download import PullProgress, PullResult, pull
from .manifest import source_of
from .refs import HubRef, parse_ref
from .store import remove_model

__all__ = ["HubRef", "PullProgress", "PullResult", "parse_ref", "pull", "remove_model", "source_of"]
