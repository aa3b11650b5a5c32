"""The native layer: everything that touches ctypes.

ctypes mirrors of ``rkllm.h`` per ABI, library loading and ABI choice, the one result callback, and a
backend object per ABI that builds the structs the runtime takes; beside them, :mod:`.rknn` mirrors
``rknn_api.h`` (``librknnrt.so``, the runtime of vision encoders) with one wrapper per
``rknn_context``. Nothing above this package touches ctypes structures or branches on the ABI.
"""
