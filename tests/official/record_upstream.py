"""Record the goldens of our default decoding (`behaviour="upstream"`) from the upstream code.

    python tests/official/record_upstream.py --repo PATH_TO_COSYVOICE_CHECKOUT

The default decoding follows the upstream `cosyvoice/llm/llm.py` of FunAudioLLM/CosyVoice
at `UPSTREAM_COMMIT`, which no registry package ships. This script checks that the
checkout (a git work tree or a bare git dir) has that commit, executes that file as it
is at that commit (`git show COMMIT:cosyvoice/llm/llm.py`), builds its `Qwen2LM` around
the official reference backbone of the tiny synthetic dir (backbone rescaled as in the
parity tests), runs the cases `UPSTREAM_CASES` of `tests/test_llm_parity.py` and writes
`tests/data/upstream/llm_upstream.json`: per case its specification and the recorded
tokens (and the error that ended the stream, if any), the commit, and the sha256 of the
synthetic `llm.pt` tensors that the tests check before comparing.

The upstream file imports `cosyvoice.utils.onnx`, which the installed reference wheel
lacks; only its `online_feature` flag is read by `Qwen2LM` (False: no online speech
token extractor), so a stub module stands in for it while the file is executed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_PATH = "cosyvoice/llm/llm.py"
OUT = ROOT / "tests" / "data" / "upstream" / "llm_upstream.json"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout


def upstream_source(repo: Path, commit: str) -> str:
    """The upstream `llm.py` at `commit`; exits with a clear message if the checkout lacks it."""
    try:
        _git(repo, "cat-file", "-e", f"{commit}^{{commit}}")
    except (OSError, subprocess.CalledProcessError):
        sys.exit(f"{repo} is not a git checkout of CosyVoice holding commit {commit}")
    return _git(repo, "show", f"{commit}:{UPSTREAM_PATH}")


def upstream_qwen2lm(ref, source: str, commit: str):
    """Execute the upstream `llm.py` and build its `Qwen2LM` around `ref`'s backbone and weights."""
    stub = types.ModuleType("cosyvoice.utils.onnx")
    stub.online_feature = False
    stub.onnx_path = ""
    stub.SpeechTokenExtractor = None
    saved = sys.modules.get("cosyvoice.utils.onnx")
    sys.modules["cosyvoice.utils.onnx"] = stub
    try:
        module = types.ModuleType("cosyvoice_upstream_llm")
        code = compile(source, f"upstream@{commit[:12]}:{UPSTREAM_PATH}", "exec")
        exec(code, module.__dict__)
    finally:
        if saved is None:
            sys.modules.pop("cosyvoice.utils.onnx", None)
        else:
            sys.modules["cosyvoice.utils.onnx"] = saved
    up = module.Qwen2LM(
        ref.llm_input_size,
        ref.llm_output_size,
        ref.speech_token_size,
        ref.llm,
        None,
        mix_ratio=[5, 15],
    )
    up.load_state_dict(ref.state_dict(), strict=True)
    return up.eval()


def record(repo: Path, out: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from cosyvoice2_testing.synthetic import cached_official_dir
    from tests import test_llm_parity as t

    source = upstream_source(repo, t.UPSTREAM_COMMIT)
    model_dir = cached_official_dir("tiny", seed=0, onnx=False)
    ref, digest = t.load_reference(model_dir)
    up = upstream_qwen2lm(ref, source, t.UPSTREAM_COMMIT)
    cases = {}
    for name, spec in t.UPSTREAM_CASES.items():
        tokens, error = t.reference_case(up, spec)
        t.check_expectation(spec, tokens, error)
        cases[name] = {"spec": spec, "tokens": tokens, "error": error}
        print(f"{name}: {len(tokens)} tokens{f', then {error}' if error else ''}")
    data = {
        "upstream": {"repo": t.UPSTREAM_REPO, "commit": t.UPSTREAM_COMMIT, "path": UPSTREAM_PATH},
        "synthetic": {
            "dir": model_dir.name,
            "llm_pt_sha256": digest,
            "backbone_scale": t.BACKBONE_SCALE,
        },
        "regenerate": t.REGENERATE,
        "cases": cases,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1)
    # lists of numbers on one line each: a short, diffable file
    text = re.sub(r"\[[-0-9.,\s]*\]", lambda m: json.dumps(json.loads(m.group(0))), text)
    out.write_text(text + "\n")
    assert json.loads(out.read_text()) == json.loads(json.dumps(data))
    print(f"wrote {out}")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="a CosyVoice git checkout")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    record(args.repo, args.out)


if __name__ == "__main__":
    main()
