"""``python -m rkllm_core.tools``: the ``rkllm`` command."""

from .cli import main

raise SystemExit(main())
