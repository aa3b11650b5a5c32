"""``python -m rkllm_core.sim``: build the simulator for both ABIs and print the paths."""

from . import main

raise SystemExit(main())
