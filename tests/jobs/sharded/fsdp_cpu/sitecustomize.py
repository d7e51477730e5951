"""FSDP on CPU processes, for the tests: accelerate selects FSDP only where it finds a GPU-like device, and on a CPU
silently trains unsharded copies. With `ACCELERATE_USE_FSDP` set (accelerate launch with an FSDP config) this makes
`PartialState` take the multi-GPU path with gloo; `ACCELERATE_TORCH_DEVICE=cpu` keeps the device a CPU. Python imports
this file at start-up when its directory is on `PYTHONPATH`."""

import os

if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and "LOCAL_RANK" in os.environ:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return "gloo", DistributedType.MULTI_GPU

    PartialState._prepare_backend = _prepare_backend
