"""Every bad input is refused by the data layer with a SiteDataError that names the problem, says how to fix it
and leaks neither cell ids nor expression values (error text may travel to the coordinator).

The bad site files of BAD_INPUTS (shared with the ClientApp tests) are refused both ways a site's data reaches the
contract: checked as a file (``check_file``) and prepared in memory (``prepare_site``, after ``read_h5ad`` for a file
that is no AnnData). DATA_ONLY holds inputs of this layer alone: raw matrices for ``detect_kind``, a plan's genes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata
import numpy as np
import pytest
from bad_sites import BAD_INPUT_NAMES, BAD_INPUTS, assert_clear_and_clean, site

from shared.data import check_file, detect_kind, prepare_site, read_h5ad
from shared.errors import SiteDataError

ROUTES = ("check_file", "prepare_site")


def _refuse(name: str, route: str, tmp: Path) -> object:
    """Hand the bad input to the data layer by ``route``."""
    case = BAD_INPUTS[name]
    if route == "check_file":
        return check_file(case.write(tmp), label_key=case.label_key, expect=case.expect)
    adata = read_h5ad(case.write(tmp)) if case.build is None else case.build()
    return prepare_site(adata, label_key=case.label_key, expect=case.expect)


def _object_matrix(_tmp: Path) -> object:
    """An object-dtype matrix (anndata can hold one; it cannot be written)."""
    x = np.array([["1", "CELL-SECRET-0001"], ["7.123456", "2"]], dtype=object)
    return detect_kind(x)


def _prepare(build: Callable[[], anndata.AnnData], **kwargs: object) -> Callable[[Path], object]:
    """Return a case runner that builds an AnnData and prepares it in memory."""
    return lambda _tmp: prepare_site(build(), label_key="cell_type", **kwargs)


@dataclass(frozen=True)
class Case:
    """A bad input of the data layer alone, the word that names its problem and the text that says how to fix it."""

    run: Callable[[Path], object]
    problem: str
    fix: str


DATA_ONLY: dict[str, Case] = {
    "object_matrix": Case(_object_matrix, "non-numeric dtype object", "astype('float32')"),
    "string_matrix": Case(lambda _t: detect_kind(np.array([["7.123456", "1"]])), "non-numeric dtype", "astype"),
    "no_vocabulary_overlap": Case(
        _prepare(site, vocabulary=["ENSG0001", "ENSG0002"]), "no overlap", "symbols vs Ensembl"
    ),
    "low_vocabulary_coverage": Case(
        _prepare(site, vocabulary=["GENE0", *[f"X{j}" for j in range(9)]], min_coverage=0.5),
        "coverage too low",
        "check gene identifiers",
    ),
}


def test_at_least_sixteen_distinct_cases() -> None:
    """The suite covers at least 16 distinct bad inputs, none of them twice."""
    assert len(BAD_INPUTS) + len(DATA_ONLY) >= 16 and not set(BAD_INPUTS) & set(DATA_ONLY)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", BAD_INPUT_NAMES)
def test_bad_site_file_is_refused_clearly_and_without_leaks(
    name: str, route: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SiteDataError naming the problem and the fix; no cell id or value in error or log text."""
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SiteDataError) as info:
        _refuse(name, route, tmp_path)
    assert_clear_and_clean(info.value, BAD_INPUTS[name].problem, BAD_INPUTS[name].fix, caplog.text)


@pytest.mark.parametrize("name", sorted(DATA_ONLY))
def test_bad_data_layer_input_is_refused_clearly_and_without_leaks(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SiteDataError naming the problem and the fix; no cell id or value in error or log text."""
    case = DATA_ONLY[name]
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SiteDataError) as info:
        case.run(tmp_path)
    assert_clear_and_clean(info.value, case.problem, case.fix, caplog.text)
