"""Test and benchmark support: synthetic official model dirs (`synthetic`, `onnx_exports`), the
official code as a reference (`official`, `shims`), the first generation's official config
(`synthetic_v1`), and what only the parity tests run: the older official decoding rules
(`legacy`).

A package of its own beside `cosyvoice2`: the runtime package never imports it
(`tests/test_runtime_isolation.py` checks that). Modules that need torch or the official code
import them lazily and say what to install when they are absent.
"""
