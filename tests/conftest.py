"""Test-wide environment, set before any test module imports a library that reads it."""

import os

# No network in tests: Hugging Face code paths run on local copies.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels are tested on CPU through Triton's interpreter; the variable must be set before
# triton is first imported, which transformers or peft may do in any earlier test.
os.environ.setdefault("TRITON_INTERPRET", "1")
