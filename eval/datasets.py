"""Test-set readers: Seed-TTS-eval `meta.lst`, a CSV file, and a plain folder.

Every reader returns a `TestSet`: utterances with an id, the prompt wav (an absolute
path), the prompt's transcript, the text to synthesise, and its language. Malformed
lines and missing wavs raise `TestSetError` naming the file and line, before any work
starts, so a long run does not fail halfway on a typo.

Formats:

- **meta.lst** (Seed-TTS-eval): one utterance a line, `id|prompt_text|prompt_wav|target_text`,
  optionally a fifth field with the ground-truth recording; wav paths are relative to
  the file's folder.
- **CSV**: a header with at least `id,prompt_text,prompt_wav,target_text` (optional
  `lang`); paths relative to the file's folder.
- **folder**: `<id>.wav` prompts, each with `<id>.prompt.txt` (its transcript) and
  `<id>.target.txt` (the text to synthesise).

The language is `en` or `zh`: given by a `lang` column, by the caller, or detected from
the target text (any CJK ideograph means Chinese).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

_CJK = re.compile("[\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
META_FIELDS = ("id", "prompt_text", "prompt_wav", "target_text")


class TestSetError(ValueError):
    """A test set that cannot be read: malformed line, duplicate id, missing wav."""

    __test__ = False  # not a pytest test class


@dataclass(frozen=True)
class Utterance:
    """One item to synthesise and score."""

    id: str
    prompt_wav: Path
    prompt_text: str
    target_text: str
    lang: str
    reference_wav: Path | None = None  # ground truth recording, when the set has one


@dataclass(frozen=True)
class TestSet:
    """A named, ordered list of utterances read from `source`."""

    __test__ = False

    name: str
    source: Path
    format: str
    utterances: tuple[Utterance, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.utterances)

    def __iter__(self):
        return iter(self.utterances)

    def describe(self) -> dict[str, object]:
        """What identifies the set in results."""
        langs = sorted({u.lang for u in self.utterances})
        return {
            "name": self.name,
            "source": str(self.source),
            "format": self.format,
            "n": len(self.utterances),
            "languages": langs,
        }


def detect_lang(text: str) -> str:
    """`zh` if the text has a CJK ideograph, else `en`."""
    return "zh" if _CJK.search(text) else "en"


def _resolve_lang(text: str, lang: str | None, where: str) -> str:
    if lang in (None, "", "auto"):
        return detect_lang(text)
    if lang not in ("en", "zh"):
        raise TestSetError(f"{where}: language {lang!r} is not en or zh")
    return lang


def _check(utts: list[Utterance], source: Path, check_files: bool) -> None:
    seen: set[str] = set()
    for u in utts:
        if u.id in seen:
            raise TestSetError(f"{source}: duplicate id {u.id!r}")
        seen.add(u.id)
    if not utts:
        raise TestSetError(f"{source}: no utterances")
    if check_files:
        missing = [f"{u.id}: {u.prompt_wav}" for u in utts if not u.prompt_wav.is_file()]
        if missing:
            shown = "\n  ".join(missing[:10])
            more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise TestSetError(
                f"{source}: {len(missing)} prompt wav(s) not found:\n  {shown}{more}"
            )


def read_meta_lst(
    path: str | Path, lang: str | None = None, check_files: bool = True, name: str | None = None
) -> TestSet:
    """Read a Seed-TTS-eval `meta.lst` (`id|prompt_text|prompt_wav|target_text[|gt_wav]`)."""
    path = Path(path)
    base = path.parent
    utts: list[Utterance] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("|")
            where = f"{path}:{lineno}"
            if len(fields) not in (4, 5):
                raise TestSetError(
                    f"{where}: expected 4 or 5 '|'-separated fields "
                    f"(id|prompt_text|prompt_wav|target_text[|gt_wav]), got {len(fields)}"
                )
            uid, prompt_text, prompt_wav, target_text = (s.strip() for s in fields[:4])
            if not uid or not prompt_wav or not target_text:
                raise TestSetError(f"{where}: empty id, prompt_wav or target_text")
            ref = base / fields[4].strip() if len(fields) == 5 and fields[4].strip() else None
            utts.append(
                Utterance(
                    id=uid,
                    prompt_wav=(base / prompt_wav).resolve(),
                    prompt_text=prompt_text,
                    target_text=target_text,
                    lang=_resolve_lang(target_text, lang, where),
                    reference_wav=ref.resolve() if ref else None,
                )
            )
    _check(utts, path, check_files)
    return TestSet(
        name=name or _default_name(path), source=path, format="meta.lst", utterances=tuple(utts)
    )


def read_csv(
    path: str | Path, lang: str | None = None, check_files: bool = True, name: str | None = None
) -> TestSet:
    """Read a CSV set with header `id,prompt_text,prompt_wav,target_text[,lang]`."""
    path = Path(path)
    base = path.parent
    utts: list[Utterance] = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in META_FIELDS if c not in header]
        if missing:
            raise TestSetError(f"{path}:1: header lacks column(s) {missing}; found {header}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or any(v is None for v in row.values()):
                raise TestSetError(f"{where}: wrong number of fields")
            uid = row["id"].strip()
            if not uid or not row["prompt_wav"].strip() or not row["target_text"].strip():
                raise TestSetError(f"{where}: empty id, prompt_wav or target_text")
            text = row["target_text"].strip()
            row_lang = (row.get("lang") or "").strip() or lang
            utts.append(
                Utterance(
                    id=uid,
                    prompt_wav=(base / row["prompt_wav"].strip()).resolve(),
                    prompt_text=row["prompt_text"].strip(),
                    target_text=text,
                    lang=_resolve_lang(text, row_lang, where),
                )
            )
    _check(utts, path, check_files)
    return TestSet(
        name=name or _default_name(path), source=path, format="csv", utterances=tuple(utts)
    )


def read_folder(
    path: str | Path, lang: str | None = None, check_files: bool = True, name: str | None = None
) -> TestSet:
    """Read a folder of `<id>.wav` prompts with `<id>.prompt.txt` and `<id>.target.txt`."""
    path = Path(path)
    utts: list[Utterance] = []
    for wav in sorted(path.glob("*.wav")):
        uid = wav.stem
        texts = {}
        for kind in ("prompt", "target"):
            txt = path / f"{uid}.{kind}.txt"
            if not txt.is_file():
                raise TestSetError(f"{path}: {wav.name} has no {txt.name}")
            texts[kind] = " ".join(txt.read_text(encoding="utf-8").split())
        if not texts["target"]:
            raise TestSetError(f"{path / (uid + '.target.txt')}: empty target text")
        utts.append(
            Utterance(
                id=uid,
                prompt_wav=wav.resolve(),
                prompt_text=texts["prompt"],
                target_text=texts["target"],
                lang=_resolve_lang(texts["target"], lang, str(wav)),
            )
        )
    orphans = sorted(
        p.name
        for p in path.glob("*.target.txt")
        if not (path / (p.name[: -len(".target.txt")] + ".wav")).is_file()
    )
    if orphans:
        raise TestSetError(f"{path}: target text(s) without a prompt wav: {orphans[:10]}")
    _check(utts, path, check_files)
    return TestSet(name=name or path.name, source=path, format="folder", utterances=tuple(utts))


def _default_name(path: Path) -> str:
    # Seed-TTS-eval keeps each set as <set>/meta.lst, so the folder names the set.
    return path.parent.name if path.stem in ("meta", "set") else path.stem


def load_test_set(
    path: str | Path, lang: str | None = None, check_files: bool = True, name: str | None = None
) -> TestSet:
    """Read a set from a meta.lst, a .csv, or a folder (with a meta.lst or set.csv, or plain)."""
    path = Path(path)
    if path.is_dir():
        for candidate in ("meta.lst", "set.csv"):
            if (path / candidate).is_file():
                return load_test_set(path / candidate, lang, check_files, name)
        return read_folder(path, lang, check_files, name)
    if not path.exists():
        raise TestSetError(f"{path}: no such file or folder")
    if path.suffix == ".csv":
        return read_csv(path, lang, check_files, name)
    return read_meta_lst(path, lang, check_files, name)


def subset(
    test_set: TestSet, ids: Iterable[str] | None = None, limit: int | None = None
) -> TestSet:
    """The same set restricted to some ids (in set order) and/or the first `limit` items."""
    utts = list(test_set.utterances)
    if ids is not None:
        wanted = set(ids)
        unknown = wanted - {u.id for u in utts}
        if unknown:
            raise TestSetError(f"{test_set.source}: unknown id(s) {sorted(unknown)[:10]}")
        utts = [u for u in utts if u.id in wanted]
    if limit is not None:
        utts = utts[:limit]
    return TestSet(test_set.name, test_set.source, test_set.format, tuple(utts))
