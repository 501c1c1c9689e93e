"""Hospital-sized sites: wall seconds and peak resident memory of every phase of one site's work, at 10 k to 1 M cells.

    python benchmarks/scale.py generate --cells 100000 --out /tmp/scale/site-100k.h5ad [--wide]
    python benchmarks/scale.py check /tmp/scale/site-100k.h5ad
    python benchmarks/scale.py site /tmp/scale/site-100k.h5ad --work /tmp/scale/work-100k [--set KEY=VALUE ...]
    # all of it, one JSON line per measurement:
    python benchmarks/scale.py run --cells 10000,100000 --dir /tmp/scale [--wide]
    python benchmarks/scale.py sites FILE --num-sites 100 --work /tmp/many [--set KEY=VALUE ...]   # many small sites

``generate`` resamples the raw counts of real PBMC cells (the team's ``pbmc_sorted_mudan``, 2 140 cells x 8 863
genes, 9 sorted populations): each new cell is a random real cell whose counts are binomially thinned with a
keep probability drawn from U(0.6, 0.9), about 900 non-zeros per cell. ``--wide`` appends the 11 533 genes of
another real file (``cellbench_lung5``, thinned to 1 %) for a 20 396-gene variant. Written as uncompressed CSR
a block of cells at a time, so generating a 1 M-cell file needs little memory.

``site`` runs the shipped ServerApp and ClientApp in one process (``server.cli.simulation.run_in_process``) with the
file as the one deployed site (``data-path``), and reports for every message the site handled its wall seconds and
peak resident memory (sampled every 20 ms from /proc/self/status, all resident pages and the anonymous ones: the
difference is mostly the memory-mapped site cache; the process's baseline - Python, torch, the coordinator - is
included). ``check`` runs ``scdd check``'s code in a fresh process. ``sites`` splits one file into
many Dirichlet(0.5) label-skewed sites and reports, for every phase of every round, the sites' seconds and the
coordinator's seconds and resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SOURCE = "pbmc_sorted_mudan.h5ad"
WIDE_SOURCE = "cellbench_lung5.h5ad"
BLOCK = 50_000
# The measured schedule: one pretraining round (a round's steps cost the same at any size), one distillation round,
# defaults otherwise.
SITE_CONFIG = {"min-sites": 1, "num-pretrain-rounds": 1, "report": False}


def _data_dir() -> Path:
    for candidate in (Path(os.environ.get("FEDSCDD_TEAM_DATA", "")), REPO.parent / "shared" / "data"):
        if (candidate / SOURCE).is_file():
            return candidate
    sys.exit(f"{SOURCE} not found: set FEDSCDD_TEAM_DATA to the folder that holds it")


def _counts(name: str) -> Any:
    import anndata as ad

    return ad.read_h5ad(_data_dir() / name)


def _thin(X: Any, p: np.ndarray, rng: np.random.Generator) -> Any:
    """Binomial thinning of each row's counts with that row's keep probability; zeros dropped."""
    import scipy.sparse as sp

    X = sp.csr_matrix(X, dtype=np.float32)
    keep = rng.binomial(np.rint(X.data).astype(np.int64), np.repeat(p, np.diff(X.indptr))).astype(np.float32)
    out = sp.csr_matrix((keep, X.indices, X.indptr), shape=X.shape)
    out.eliminate_zeros()
    return out


def generate(n_cells: int, out: Path, *, wide: bool, seed: int = 0) -> None:
    """Write a site of ``n_cells`` resampled real cells as an uncompressed CSR .h5ad, ``BLOCK`` cells at a time."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    src = _counts(SOURCE)
    extra = _counts(WIDE_SOURCE) if wide else None
    genes = list(src.var_names) + ([f"lung5_{g}" for g in extra.var_names] if extra is not None else [])
    picks = rng.integers(0, src.n_obs, n_cells)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(src.obs["cell_type"].astype(str).to_numpy()[picks])},
        index=pd.Index([f"cell{i}" for i in range(n_cells)]),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.h5ad")
    ad.AnnData(
        X=sp.csr_matrix((n_cells, len(genes)), dtype=np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(genes))
    ).write_h5ad(tmp)
    with h5py.File(tmp, "r+") as f:
        del f["X"]
        g = f.create_group("X")
        g.attrs.update(
            {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": np.array([n_cells, len(genes)])}
        )
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 18,))
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        for start in range(0, n_cells, BLOCK):
            rows = picks[start : start + BLOCK]
            block = _thin(src.X[rows], rng.uniform(0.6, 0.9, rows.size), rng)
            if extra is not None:
                other = _thin(extra.X[rng.integers(0, extra.n_obs, rows.size)], np.full(rows.size, 0.01), rng)
                block = sp.hstack([block, other], format="csr")
            n = data.shape[0]
            data.resize((n + block.nnz,))
            indices.resize((n + block.nnz,))
            data[n:] = block.data
            indices[n:] = block.indices
            indptr[start + 1 : start + rows.size + 1] = n + block.indptr[1:]
            print(json.dumps({"generated": start + rows.size, "of": n_cells}), file=sys.stderr, flush=True)
        g.create_dataset("indptr", data=indptr)
    os.replace(tmp, out)
    print(
        json.dumps(
            {
                "file": str(out),
                "cells": n_cells,
                "genes": len(genes),
                "nnz": int(indptr[-1]),
                "nnz_per_cell": round(float(indptr[-1]) / n_cells, 1),
                "bytes": out.stat().st_size,
            }
        )
    )


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def check(path: Path) -> None:
    """``scdd check``'s code on the file; wall seconds and this process's peak resident memory."""
    from shared.data import check_file

    start = time.perf_counter()
    report = check_file(path, label_key="cell_type")
    print(
        json.dumps(
            {
                "phase": "check",
                "cells": report.n_cells,
                "genes": report.n_genes,
                "seconds": round(time.perf_counter() - start, 1),
                "peak_rss_mb": round(_peak_mb()),
            }
        )
    )


class RssSampler:
    """The process's resident memory, sampled every ``every`` seconds; ``window()`` gives the peaks since the last call.

    Two figures: all resident pages (VmRSS) and the anonymous ones (RssAnon). The difference is mostly the memory-mapped
    site cache: file pages the kernel can drop and re-read whenever memory is short.
    """

    def __init__(self, every: float = 0.02) -> None:
        self._peak = (0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> tuple[int, int]:
        """(VmRSS, RssAnon) in kB."""
        found = {}
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                key = line.split(":")[0]
                if key in ("VmRSS", "RssAnon"):
                    found[key] = int(line.split()[1])
        return found.get("VmRSS", 0), found.get("RssAnon", 0)

    @staticmethod
    def rss_kb() -> int:
        return RssSampler.now()[0]

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            rss, anon = self.now()
            self._peak = (max(self._peak[0], rss), max(self._peak[1], anon))

    def window(self) -> tuple[float, float]:
        """Peak (resident, anonymous) MB since the last call (the current values start the next window)."""
        rss, anon = self.now()
        peak = (max(self._peak[0], rss), max(self._peak[1], anon))
        self._peak = (rss, anon)
        return peak[0] / 1024.0, peak[1] / 1024.0


def site(path: Path, work: Path, overrides: dict[str, Any]) -> None:
    """One deployed site of ``path`` in the in-process federation; one JSON line per message the site handled."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from server.cli.simulation import app_config_defaults, component_ref, load_component, run_in_process

    client = load_component(component_ref("clientapp"))
    sampler = RssSampler()
    rows: list[dict[str, Any]] = []

    def measured(msg: Any, ctx: Any) -> Any:
        sampler.window()
        start = time.perf_counter()
        reply = client(msg, ctx)
        rss, anon = sampler.window()
        rows.append(
            {
                "phase": msg.metadata.message_type,
                "seconds": round(time.perf_counter() - start, 1),
                "peak_rss_mb": round(rss),
                "peak_anon_mb": round(anon),
            }
        )
        if reply.has_error():
            rows[-1]["error"] = reply.error.reason[:300]
        print(json.dumps(rows[-1]), flush=True)
        return reply

    run_config = {**app_config_defaults(), **SITE_CONFIG, "out-dir": str(work), "run-id": "run", **overrides}
    node = {"data-path": str(path.resolve()), "site-name": "hospital", "cache-dir": str(work / "cache")}
    start = time.perf_counter()
    run_in_process(run_config, num_nodes=1, node_configs=[node], client_app=measured)
    print(
        json.dumps(
            {
                "phase": "whole run",
                "seconds": round(time.perf_counter() - start, 1),
                "peak_rss_mb": round(_peak_mb()),
                "completed": (work / "run" / "metrics.json").is_file(),
            }
        )
    )


def many_sites(data: Path, n_sites: int, work: Path, overrides: dict[str, Any]) -> None:
    """An in-process federation of ``n_sites`` Dirichlet-split sites of ``data``: per group of messages (one phase of
    one round), the sites' seconds, the coordinator's seconds until the next group (aggregation, fusion, training) and
    its resident memory."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from server.cli.simulation import app_config_defaults, component_ref, load_component, run_in_process

    client = load_component(component_ref("clientapp"))
    sampler = RssSampler()
    groups: list[dict[str, Any]] = []
    last = {"end": time.perf_counter()}

    def measured(msg: Any, ctx: Any) -> Any:
        start = time.perf_counter()
        kind = msg.metadata.message_type
        if not groups or groups[-1]["phase"] != kind or groups[-1]["sites"] == n_sites:
            if groups:
                groups[-1]["coordinator_seconds_after"] = round(start - last["end"], 2)
                groups[-1]["coordinator_rss_mb"] = round(sampler.rss_kb() / 1024)
                print(json.dumps(groups[-1]), flush=True)
            groups.append({"phase": kind, "sites": 0, "site_seconds": 0.0})
        reply = client(msg, ctx)
        last["end"] = time.perf_counter()
        groups[-1]["sites"] += 1
        groups[-1]["site_seconds"] = round(groups[-1]["site_seconds"] + last["end"] - start, 2)
        if reply.has_error():
            groups[-1]["error"] = reply.error.reason[:300]
        return reply

    run_config = {
        **app_config_defaults(),
        "sim-data-path": str(data.resolve()),
        "sim-num-sites": n_sites,
        "sim-site-key": "",
        "out-dir": str(work),
        "run-id": "run",
        "report": False,
        **overrides,
    }
    start = time.perf_counter()
    run_in_process(run_config, num_nodes=n_sites, client_app=measured)
    if groups:
        groups[-1]["coordinator_seconds_after"] = round(time.perf_counter() - last["end"], 2)
        print(json.dumps(groups[-1]), flush=True)
    print(
        json.dumps(
            {
                "phase": "whole run",
                "sites": n_sites,
                "seconds": round(time.perf_counter() - start, 1),
                "peak_rss_mb": round(_peak_mb()),
                "completed": (work / "run" / "metrics.json").is_file(),
            }
        )
    )


def _child(args: list[str], log: Callable[[str], None]) -> None:
    proc = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    for line in proc.stdout.splitlines():
        log(line)
    if proc.returncode:
        log(json.dumps({"failed": args, "rc": proc.returncode, "stderr": proc.stderr[-2000:]}))


def run_all(sizes: list[int], folder: Path, *, wide: bool, overrides: list[str]) -> None:
    """Generate (if missing), check and run one site of every size; JSON lines to stdout and ``folder/scale.jsonl``."""
    out = folder / "scale.jsonl"

    def log(line: str) -> None:
        print(line, flush=True)
        with out.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    for n in sizes:
        tag = f"{n // 1000}k{'-wide' if wide else ''}"
        path = folder / f"site-{tag}.h5ad"
        if not path.is_file():
            _child(
                ["generate", "--cells", str(n), "--out", str(path), *(["--wide"] if wide else [])],
                lambda line, t=tag: log(json.dumps({"size": t, **json.loads(line)})),
            )
        _child(["check", str(path)], lambda line, t=tag: log(json.dumps({"size": t, **json.loads(line)})))
        work = folder / f"work-{tag}"
        _child(
            ["site", str(path), "--work", str(work), *[a for kv in overrides for a in ("--set", kv)]],
            lambda line, t=tag: log(json.dumps({"size": t, **json.loads(line)})),
        )


def main() -> None:
    from server.cli.simulation import parse_overrides

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--cells", type=int, required=True)
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--wide", action="store_true")
    c = sub.add_parser("check")
    c.add_argument("file", type=Path)
    s = sub.add_parser("site")
    s.add_argument("file", type=Path)
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--set", action="append", default=[])
    m = sub.add_parser("sites")
    m.add_argument("file", type=Path)
    m.add_argument("--num-sites", type=int, required=True)
    m.add_argument("--work", type=Path, required=True)
    m.add_argument("--set", action="append", default=[])
    r = sub.add_parser("run")
    r.add_argument("--cells", default="10000,100000,300000,1000000")
    r.add_argument("--dir", type=Path, required=True)
    r.add_argument("--wide", action="store_true")
    r.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    if args.command == "generate":
        generate(args.cells, args.out, wide=args.wide)
    elif args.command == "check":
        check(args.file)
    elif args.command == "site":
        site(args.file, args.work, parse_overrides(args.set))
    elif args.command == "sites":
        many_sites(args.file, args.num_sites, args.work, parse_overrides(args.set))
    else:
        args.dir.mkdir(parents=True, exist_ok=True)
        run_all([int(v) for v in args.cells.split(",")], args.dir, wide=args.wide, overrides=args.set)


if __name__ == "__main__":
    main()
