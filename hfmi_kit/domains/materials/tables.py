"""Property tables: the bundled Matbench sets, user CSVs, and literature/lab records with units.

Every loader returns a :class:`PropertyTable`: the accepted rows (formula, reduced formula,
value in the canonical unit, source) and every rejected row with its reason. Nothing is dropped
silently: rejections are counted, written next to the outputs, and ``strict=True`` turns the
first batch of them into one :class:`DataError`.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hfmi_kit.domains.materials.chem import DATA_DIR, Parsed, parse_formula
from hfmi_kit.errors import DataError

BUNDLED = {
    "expt_gap": ("expt_gap.csv", "experimental band gaps (eV), Matbench expt_gap (Zhuo et al. 2018)"),
    "mp_gap": ("mp_gap.csv.gz", "DFT-PBE band gaps (eV), Matbench mp_gap (Materials Project)"),
}
H_EV_NM = 1239.841984  # h c in eV nm
EV_PER_J = 1.0 / 1.602176634e-19
EV_PER_KJ_MOL = 1.0 / 96.48533212
# canonical unit per property, and factors (or functions) from the units we accept
UNITS: dict[str, tuple[str, dict[str, Any]]] = {
    "band_gap": ("eV", {"ev": 1.0, "mev": 1e-3, "j": EV_PER_J, "kj/mol": EV_PER_KJ_MOL,
                        "kcal/mol": 4.184 * EV_PER_KJ_MOL, "cm-1": 1.0 / 8065.543937,
                        "nm": lambda v: H_EV_NM / v}),  # absorption-edge wavelength
    "efficiency": ("%", {"%": 1.0, "percent": 1.0, "fraction": 100.0}),
}


@dataclass
class PropertyTable:
    """Accepted rows plus counted rejections; columns are parallel lists."""

    formula: list[str] = field(default_factory=list)
    reduced: list[str] = field(default_factory=list)
    value: list[float] = field(default_factory=list)
    source: list[str] = field(default_factory=list)
    parsed: list[Parsed] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {"row", "formula", "reason"}
    unit: str = "eV"
    name: str = ""
    sha256: str = ""

    def __len__(self) -> int:
        return len(self.formula)

    @property
    def y(self) -> np.ndarray:
        return np.asarray(self.value, dtype=np.float64)

    def subset(self, idx: Sequence[int]) -> PropertyTable:
        """The rows at ``idx`` (rejections are not carried over)."""
        t = PropertyTable(unit=self.unit, name=self.name, sha256=self.sha256)
        for i in idx:
            t.formula.append(self.formula[i])
            t.reduced.append(self.reduced[i])
            t.value.append(self.value[i])
            t.source.append(self.source[i])
            t.parsed.append(self.parsed[i])
        return t

    def without(self, reduced: Iterable[str]) -> PropertyTable:
        """Rows whose reduced formula is not in ``reduced``."""
        drop = set(reduced)
        return self.subset([i for i, r in enumerate(self.reduced) if r not in drop])

    def to_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame({"formula": self.formula, "reduced_formula": self.reduced,
                             f"value_{self.unit}": self.value, "source": self.source})

    def rejection_summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rejected:
            key = r["reason"].split(":", 1)[-1].split("(", 1)[0].strip()[:60]
            out[key] = out.get(key, 0) + 1
        return out

    def raise_if_rejected(self) -> None:
        if self.rejected:
            first = "; ".join(f"row {r['row']}: {r['reason']}" for r in self.rejected[:5])
            raise DataError(f"{self.name}: {len(self.rejected)} row(s) rejected: {first}"
                            f"{' ...' if len(self.rejected) > 5 else ''}")


def bundled_path(name: str) -> Path:
    """Path of a bundled data set (``expt_gap``, ``mp_gap``)."""
    if name not in BUNDLED:
        raise DataError(f"unknown bundled data set {name!r}; expected one of {sorted(BUNDLED)}")
    return DATA_DIR / BUNDLED[name][0]


def resolve(data: str | Path) -> Path:
    """A bundled set's name or a CSV path, checked to exist."""
    if str(data) in BUNDLED:
        return bundled_path(str(data))
    p = Path(data)
    if not p.is_file():
        raise DataError(f"{p}: no such CSV file (or bundled set; expected one of {sorted(BUNDLED)})")
    return p


def _to_float(v: Any) -> float:
    if isinstance(v, str):
        v = v.strip()
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError("is not a number") from None
    if not math.isfinite(x):
        raise ValueError("is not a finite number")
    return x


def _merge(rows: list[tuple[int, Parsed, float, str]], *, name: str, duplicates: str, tolerance: float,
           table: PropertyTable) -> None:
    """Group rows by reduced formula; equal-within-``tolerance`` duplicates merge (mean value, all
    sources kept); conflicting ones are rejected (``reject``), averaged (``mean``) or all kept."""
    if duplicates not in ("reject", "mean", "keep"):
        raise DataError(f"duplicates must be 'reject', 'mean' or 'keep', got {duplicates!r}")
    if duplicates == "keep":
        for _, p, v, s in rows:
            table.formula.append(p.formula)
            table.reduced.append(p.reduced)
            table.value.append(v)
            table.source.append(s)
            table.parsed.append(p)
        return
    groups: dict[str, list[tuple[int, Parsed, float, str]]] = {}
    for r in rows:
        groups.setdefault(r[1].reduced, []).append(r)
    for red, g in groups.items():
        vals = [v for _, _, v, _ in g]
        if len(g) > 1 and max(vals) - min(vals) > tolerance + 1e-9 and duplicates == "reject":
            for row, p, _, _ in g:
                table.rejected.append({"row": row, "formula": p.formula, "reason": (
                    f"duplicate formula {red} with conflicting values {sorted(round(x, 4) for x in vals)} "
                    f"(spread > {tolerance} {table.unit})")})
            continue
        sources = "; ".join(dict.fromkeys(s for _, _, _, s in g if s))
        table.formula.append(g[0][1].formula)
        table.reduced.append(red)
        table.value.append(float(np.mean(vals)))
        table.source.append(sources)
        table.parsed.append(g[0][1])


_COMPRESSED = (".gz", ".bz2", ".zip", ".xz", ".zst", ".tar")


def _check_text_file(path: Path, expected: str) -> bytes:
    """The first KiB of a CSV, after refusing an empty or binary file (compressed CSVs pass)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from e
    if size == 0:
        raise DataError(f"{path}: empty file (0 bytes); {expected}")
    if path.suffix.lower() in _COMPRESSED:
        return b""
    nul = head.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path}: a binary file, not a text CSV (NUL byte at offset {nul}); {expected}")
    return head[:1024]


def _format_hint(head: bytes, df: Any) -> str:
    """Why a file's columns are not the expected ones, when it is plainly another format."""
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if text[:1] in ("{", "["):
        return "; the file looks like JSON, not a CSV"
    header = text.splitlines()[0] if text else ""
    if len(df.columns) == 1:
        for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "bars")):
            if sep in header:
                return f"; the header is separated by {name}, a CSV needs commas"
    return ""


def load_property_csv(data: str | Path, *, target: str | None = None, duplicates: str = "reject",
                      tolerance: float = 0.1, strict: bool = False, min_value: float | None = 0.0) -> PropertyTable:
    """Read a CSV with a ``formula`` column and a value column (``target`` or the named one), in eV.

    Optional columns ``source`` (provenance, default the file name) and ``unit`` (then values are
    converted to eV; a row with an empty or unknown unit is rejected). Bad rows (unparseable
    formula, unknown element, non-positive amount, non-numeric or NaN value, a value below
    ``min_value``, conflicting duplicates) are rejected and counted; ``strict`` raises instead.
    """
    import pandas as pd

    path = resolve(data)
    col = target or "target"
    expected = f"expected a CSV with a header line 'formula,{col}' and one row per composition"
    head = _check_text_file(path, expected)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{path}: no header line (the file holds only blank lines); {expected}") from e
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError, ValueError, zlib.error) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a readable CSV, it is malformed or truncated ({first})") from e
    missing = [c for c in ("formula", col) if c not in df.columns]
    if missing:
        hint = _format_hint(head, df) or " (pass --target to name the value column)"
        raise DataError(f"{path}: missing column(s) {missing}; found {list(df.columns)}{hint}")
    if df.empty:
        raise DataError(f"{path}: no rows (only the header line); {expected}")
    table = PropertyTable(name=path.name, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    rows: list[tuple[int, Parsed, float, str]] = []
    units = UNITS["band_gap"][1]
    for i, rec in enumerate(df.to_dict("records")):
        row = i + 2  # 1-based, after the header: what a spreadsheet shows
        try:
            p = parse_formula(rec["formula"])
            try:
                v = _to_float(rec[col])
            except ValueError as e:
                raise DataError(f"{col}={rec[col]!r} {e}") from e
            if "unit" in rec:
                v = _convert(v, rec["unit"], units, "eV")
            if min_value is not None and v < min_value:
                raise DataError(f"{col}={v} is below {min_value}")
        except DataError as e:
            table.rejected.append({"row": row, "formula": str(rec["formula"]), "reason": str(e)})
            continue
        rows.append((row, p, v, str(rec.get("source", "") or path.name)))
    _merge(rows, name=path.name, duplicates=duplicates, tolerance=tolerance, table=table)
    if strict:
        table.raise_if_rejected()
    if not len(table):
        raise DataError(f"{path}: no usable rows ({len(table.rejected)} rejected, e.g. "
                        f"{table.rejected[0]['reason'] if table.rejected else 'none'})")
    return table


def _convert(v: float, unit: Any, units: dict[str, Any], canonical: str) -> float:
    u = str(unit or "").strip().lower().replace(" ", "")
    if not u:
        raise DataError(f"value {v} has no unit (expected one of {sorted(units)})")
    if u not in units:
        raise DataError(f"unknown unit {unit!r}; expected one of {sorted(units)}")
    f = units[u]
    if callable(f):
        if v <= 0:
            raise DataError(f"{v} {unit} cannot be converted to {canonical}")
        return float(f(v))
    return float(v * f)


def ingest_records(records: Any, *, prop: str = "band_gap", duplicates: str = "reject", tolerance: float = 0.1,
                   strict: bool = False) -> PropertyTable:
    """Merge literature / lab records into one table of ``prop`` in its canonical unit.

    ``records``: a DataFrame, a CSV path, or a list of either, with columns ``formula``,
    ``property``, ``value``, ``unit``, ``source``. Rows of other properties are skipped (counted
    in ``rejected`` with that reason); units are converted (band gap: eV, meV, J, kJ/mol,
    kcal/mol, cm-1, or nm for an absorption edge); provenance is kept: merged duplicates list
    every source. Duplicates within ``tolerance`` merge; conflicting ones are rejected.
    """
    import pandas as pd

    if prop not in UNITS:
        raise DataError(f"unknown property {prop!r}; expected one of {sorted(UNITS)}")
    canonical, units = UNITS[prop]
    parts = records if isinstance(records, list) else [records]
    frames = []
    for part in parts:
        df = pd.read_csv(part, dtype=str, keep_default_na=False) if isinstance(part, (str, Path)) else part
        need = ["formula", "property", "value", "unit", "source"]
        missing = [c for c in need if c not in df.columns]
        if missing:
            raise DataError(f"{part if isinstance(part, (str, Path)) else 'records'}: missing column(s) {missing}; "
                            f"expected {need}")
        frames.append(df[need].astype(str))
    df = pd.concat(frames, ignore_index=True)
    table = PropertyTable(unit=canonical, name=f"{prop} records")
    rows: list[tuple[int, Parsed, float, str]] = []
    for i, rec in enumerate(df.to_dict("records")):
        try:
            if rec["property"].strip().lower().replace(" ", "_") != prop:
                raise DataError(f"property {rec['property']!r} is not {prop!r}")
            p = parse_formula(rec["formula"])
            try:
                v = _to_float(rec["value"])
            except ValueError as e:
                raise DataError(f"value {rec['value']!r} {e}") from e
            v = _convert(v, rec["unit"], units, canonical)
            if v < 0:
                raise DataError(f"negative {prop} {v} {canonical}")
            if not rec["source"].strip():
                raise DataError("no source given (provenance is required)")
        except DataError as e:
            table.rejected.append({"row": i, "formula": rec["formula"], "reason": str(e)})
            continue
        rows.append((i, p, v, rec["source"].strip()))
    _merge(rows, name=table.name, duplicates=duplicates, tolerance=tolerance, table=table)
    if strict:
        table.raise_if_rejected()
    return table
