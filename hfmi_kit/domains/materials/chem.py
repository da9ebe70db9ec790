"""Compositions: parsing with pymatgen, the element vocabulary, set encoding and Magpie features.

A composition enters as a formula string (``CsPbI3``, ``Cu2ZnSnS4``, ``CsPb(I0.5Br0.5)3``) and
leaves as element ids and atomic fractions (the set the model tokenizes) or as a Magpie-style
feature vector (for the random-forest baseline). Every check names the formula and the problem.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hfmi_kit.errors import DataError

DATA_DIR = Path(__file__).with_name("data")
MAX_Z = 103  # H .. Lr: every element with measured or computed materials data
MAGPIE_STATS = ("mean", "avg_dev", "min", "max", "range", "mode")
_SYMBOL = re.compile(r"([A-Z][a-z]?)")
_ZERO = re.compile(r"([A-Z][a-z]?)0+(?:\.0*)?(?![\d.]*[1-9])")


def _pmg() -> tuple:  # pymatgen is the [materials] extra: imported lazily
    try:
        from pymatgen.core import Composition, Element
    except ImportError as e:
        raise ImportError("the materials domain needs pymatgen; install it with `pip install hfmi_kit[materials]`"
                          ) from e
    return Composition, Element


@functools.lru_cache(maxsize=1)
def element_symbols() -> tuple[str, ...]:
    """Symbols of the vocabulary in Z order; an element's id is its index (Z - 1)."""
    _, Element = _pmg()
    return tuple(Element.from_Z(z).symbol for z in range(1, MAX_Z + 1))


@functools.lru_cache(maxsize=1)
def _element_index() -> dict[str, int]:
    return {s: i for i, s in enumerate(element_symbols())}


@dataclass(frozen=True)
class Parsed:
    """A checked composition: reduced formula and atomic fractions in Z order."""

    formula: str  # the input, stripped
    reduced: str  # pymatgen reduced formula (the key for duplicates)
    elements: tuple[str, ...]
    fractions: tuple[float, ...]  # sum to 1

    @property
    def ids(self) -> tuple[int, ...]:
        idx = _element_index()
        return tuple(idx[e] for e in self.elements)


def parse_formula(formula: object) -> Parsed:
    """Parse and check one formula; raise :class:`DataError` saying what is wrong with it.

    Rejected: empty or non-text input, strings pymatgen cannot parse, symbols that are not
    elements H..Lr (``Xx``, ``MA`` in ``MAPbI3``), negative or zero amounts.
    """
    if not isinstance(formula, str) or not formula.strip():
        raise DataError(f"formula {formula!r}: empty or not text")
    return _parse(formula.strip())


@functools.lru_cache(maxsize=262144)
def _parse(f: str) -> Parsed:  # pymatgen parsing is ~0.1 ms a formula: repeated loads reuse it
    zero = _ZERO.findall(f)
    if zero:
        raise DataError(f"formula {f!r}: zero amount for {', '.join(zero)}")
    Composition, _ = _pmg()
    try:
        comp = Composition(f)
    except (ValueError, KeyError, TypeError) as e:
        msg = str(e)
        reason = "negative amount" if "negative" in msg else f"cannot be parsed ({msg})"
        raise DataError(f"formula {f!r}: {reason}") from e
    amounts = comp.get_el_amt_dict()
    idx = _element_index()
    unknown = sorted(s for s in amounts if s not in idx)
    if unknown:
        raise DataError(f"formula {f!r}: unknown element(s) {unknown}; expected symbols of H..Lr")
    if not amounts or any(a <= 0 for a in amounts.values()):
        raise DataError(f"formula {f!r}: amounts must be positive, got {amounts}")
    els = sorted(amounts, key=idx.__getitem__)
    total = float(sum(amounts.values()))
    return Parsed(formula=f, reduced=comp.reduced_formula, elements=tuple(els),
                  fractions=tuple(float(amounts[e]) / total for e in els))


def encode(parsed: list[Parsed], max_elements: int | None = None) -> dict[str, np.ndarray]:
    """Padded arrays for the set tokenizer: ``elements`` (N, S) int64, ``fractions`` (N, S), ``padding`` (N, S)."""
    S = max_elements or max(len(p.elements) for p in parsed)
    too_long = [p.formula for p in parsed if len(p.elements) > S]
    if too_long:
        raise DataError(f"{len(too_long)} composition(s) have more than {S} elements (e.g. {too_long[0]!r}); "
                        "the model was built for at most that many")
    N = len(parsed)
    el = np.zeros((N, S), dtype=np.int64)
    fr = np.zeros((N, S), dtype=np.float32)
    pad = np.ones((N, S), dtype=bool)
    for i, p in enumerate(parsed):
        n = len(p.elements)
        el[i, :n] = p.ids
        fr[i, :n] = p.fractions
        pad[i, :n] = False
    return {"elements": el, "fractions": fr, "padding": pad}


@functools.lru_cache(maxsize=1)
def magpie_table() -> tuple[tuple[str, ...], np.ndarray]:
    """The Magpie element property table: (property names, (MAX_Z, P) array; NaN where unknown)."""
    import csv

    with open(DATA_DIR / "magpie.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    names = tuple(rows[0][1:])
    table = np.full((MAX_Z, len(names)), np.nan)
    idx = _element_index()
    for r in rows[1:]:
        if r[0] in idx:
            table[idx[r[0]]] = [float(v) if v not in ("", "nan") else np.nan for v in r[1:]]
    return names, table


def magpie_feature_names() -> list[str]:
    names, _ = magpie_table()
    return [f"{s}_{n}" for s in MAGPIE_STATS for n in names]


def magpie_features(parsed: list[Parsed]) -> np.ndarray:
    """Magpie-style composition features (N, 6 * 22): fraction-weighted mean, mean absolute
    deviation, min, max, range and the property of the most abundant element.

    Elements missing from the table take the property's mean over the table's elements.
    """
    _, table = magpie_table()
    filled = np.where(np.isnan(table), np.nanmean(table, axis=0, keepdims=True), table)
    out = np.empty((len(parsed), 6 * table.shape[1]))
    for i, p in enumerate(parsed):
        v = filled[list(p.ids)]  # (n, P)
        w = np.asarray(p.fractions)[:, None]
        mean = (w * v).sum(0)
        out[i] = np.concatenate([mean, (w * np.abs(v - mean)).sum(0), v.min(0), v.max(0), v.max(0) - v.min(0),
                                 v[int(np.argmax(w[:, 0]))]])
    return out


def charge_balanced(formula: str) -> bool:
    """True when pymatgen finds at least one oxidation-state assignment summing to zero."""
    Composition, _ = _pmg()
    try:
        return bool(Composition(formula).oxi_state_guesses(max_sites=-50))
    except ValueError:
        return False


def chemistry_class(p: Parsed) -> str:
    """A coarse chemical family for error breakdowns: the anion-like element group, or 'intermetallic'."""
    anions = [("O", "oxide"), ("S", "sulfide"), ("Se", "selenide"), ("Te", "telluride"), ("N", "nitride"),
              ("P", "pnictide"), ("As", "pnictide"), ("Sb", "pnictide"), ("F", "halide"), ("Cl", "halide"),
              ("Br", "halide"), ("I", "halide"), ("C", "carbide"), ("B", "boride"), ("H", "hydride")]
    for el, name in anions:
        if el in p.elements and len(p.elements) > 1:
            return name
    return "elemental" if len(p.elements) == 1 else "intermetallic"
