"""``hookmoe sweep`` / ``search`` / ``compare`` / ``run``: choosing a plan and the whole pipeline.

Each command's options are one dataclass of the library (:class:`~hookmoe.search.sweep.SweepOptions`,
:class:`~hookmoe.search.paper.SearchOptions`, :class:`~hookmoe.search.compare.CompareOptions`,
:class:`~hookmoe.search.pipeline.RunOptions`); the flags are generated from it (:mod:`hookmoe.cli.options`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from hookmoe.search.allocators import get_allocator
from hookmoe.search.compare import CompareOptions, CompareSettings, check_act, compare, compare_markdown, write_compare
from hookmoe.search.paper import SearchOptions, SearchSettings, search, search_plan
from hookmoe.search.pipeline import PipelineSettings, RunOptions, run_pipeline
from hookmoe.search.sweep import SweepOptions, SweepSettings, sweep, write_sweep


def _load(o):
    """The model of a command's options (``model``, ``seed`` and :class:`~hookmoe.models.loading.LoadOptions`)."""
    from hookmoe.hook import load

    return load(o.model, seed=o.seed, **o.load_kwargs())


def sweep_cmd(o: SweepOptions) -> None:
    """Sensitivity sweep: k-1 experts in every layer range [l, r] over groups of layers; heatmap."""
    from hookmoe.cli.common import console
    from hookmoe.files import atomic_dir, check_output

    out = o.out
    check_output(out, kind="dir", flag="--out")
    mm = _load(o)
    res = sweep(mm, o.scorer(mm), progress=True, **o.pick(SweepSettings))
    res["model"], res["data"] = o.model, o.data
    with atomic_dir(out) as work:
        paths = {k: out / Path(v).name for k, v in write_sweep(res, work).items()}
    _print_sweep(console, res)
    console.print(f"wrote {paths['json']}, {paths['csv']}, {paths['png']} ({res['time_s']:.1f} s)")


def search_cmd(o: SearchOptions) -> None:
    """TLNLE search (paper §3.3): lower k, then l, within the tolerance; then pick the Hook layer."""
    from hookmoe.files import check_output

    if o.allocator is not None:
        get_allocator(o.allocator)  # a bad name fails before the model loads
    out = check_output(o.out, kind="file", flag="--out")
    check_output(o.log_path(), kind="file", flag="--log" if o.log else "--out (its search log)")
    check_output(o.summary_path(), kind="file", flag="--out (its search summary)")
    mm = _load(o)
    sc = o.scorer(mm)
    if o.allocator is not None:
        _allocate_plan(o, mm, sc, out)
    else:
        _search_plan(o, mm, sc, out)


def _allocate_plan(o: SearchOptions, mm, sc, out: Path) -> None:
    """``search --allocator``: a per-layer plan from the allocator instead of the §3.3 search."""
    from hookmoe.cli.common import console
    from hookmoe.eval.run import _eval_blocks

    alloc = get_allocator(o.allocator)
    cb = _eval_blocks(mm, o.train_source(o.calib), o.calib_blocks, o.block_len, o.seed, "train", True) \
        if alloc.needs_sensitivity else None
    plan = alloc.allocate(mm, target_act=o.act, tolerance=None if o.act is not None else o.tolerance, calib=cb,
                          scorer=sc if o.act is None else None, progress=True)
    plan.save(out)
    a = plan.meta["allocation"]
    console.print(f"plan ({a['allocator']}) {plan.base}: Act {a['act']:.4g}"
                  + (f" (target {a['target_act']:g}{'' if a['exact'] else ', nearest below'})"
                     if a.get("target_act") is not None else f" (tolerance {100 * o.tolerance:g}%)"))
    console.print(f"wrote {out}")


def _search_plan(o: SearchOptions, mm, sc, out: Path) -> None:
    """The §3.3 search, its plan in ``out`` and its summary and log next to it."""
    from hookmoe import report
    from hookmoe.cli.common import console
    from hookmoe.eval.run import _eval_blocks

    tb = None
    if o.hook:
        tb = _eval_blocks(mm, o.train_source(o.calib), o.train_blocks, o.block_len, o.seed, "train", True)
    res = search(mm, sc, train_blocks=tb, log_path=o.log_path(), console=console, **o.pick(SearchSettings))
    search_plan(res).save(out)
    report.write_json(o.summary_path(), {k: v for k, v in res.items() if k != "log"})
    console.print(f"plan {res['plan']}: score {res['score']:.4f} (drop {100 * res['drop']:+.2f}%, "
                  f"Act {res['act']:.3f}) after {res['evals']} evaluations in {res['time_s']:.1f} s")
    if res.get("hook"):
        h = res["hook"]
        console.print(f"hook layer {h['layer']} under {h['plan']}: score {h['score']:.4f} "
                      f"(without hook {h['no_hook_score']:.4f})")
    console.print(f"wrote {out} and {o.log_path()}")


def compare_cmd(o: CompareOptions) -> None:
    """All methods at a matched Act on the same data: one table (markdown + JSON) and a plot."""
    from hookmoe.cli.common import console
    from hookmoe.eval.run import _eval_blocks
    from hookmoe.files import atomic_dir, check_output

    out = o.out
    check_output(out, kind="dir", flag="--out")
    mm = _load(o)
    check_act(mm, o.act)
    sc = o.scorer(mm)
    n_cal, n_tr = o.block_counts()
    cb = tb = None
    if n_cal + n_tr:
        both = _eval_blocks(mm, o.train_source(o.calib), n_cal + n_tr, o.block_len, o.seed, "train", True)
        cb, tb = (both[:n_cal] if n_cal else None), (both[n_cal:] if n_tr else None)
    with atomic_dir(out) as work:
        res = compare(mm, sc, o.act, calib_blocks=cb, train_blocks=tb, hook_out=(work / "hook") if n_tr else None,
                      console=console, batch_size=o.batch_size, **o.pick(CompareSettings))
        res["model"], res["data"] = o.model, o.data
        paths = {k: out / Path(v).name for k, v in
                 write_compare(res, work, title=f"{o.model}: methods at Act {o.act:g}").items()}
    print(compare_markdown(res))
    console.print(f"wrote {paths['md']}, {paths['json']}, {paths['png']} ({res['time_s']:.1f} s)")


def run_cmd(o: RunOptions) -> None:
    """One command: sweep → search → train → eval → report (report.md, plots, hook artifact, JSON)."""
    from hookmoe.cli.common import console
    from hookmoe.files import atomic_dir, check_output

    out = o.out
    check_output(out, kind="dir", flag="--out")
    mm = _load(o)
    with atomic_dir(out) as work:  # report.md, plots, hook/ land together, or not at all
        res = run_pipeline(mm, out=work, final_out=out, console=console, model_name=o.model,
                           command="hookmoe " + " ".join(sys.argv[1:]) if sys.argv else None,
                           **o.pick(PipelineSettings))
    g = res["gap_recovered"]
    console.print(f"done in {res['wall_time_s']:.1f} s: plan {res['search']['plan']}, hook layer "
                  f"{res['hook']['layer']} under {res['hook']['plan']}; gap recovered "
                  f"{'n/a' if g is None else f'{100 * g:.1f}%'}; report: {Path(out) / 'report.md'}")


def register_cli(app) -> None:
    from hookmoe.cli.options import options_command

    options_command(app, "sweep", SweepOptions)(sweep_cmd)
    options_command(app, "search", SearchOptions)(search_cmd)
    options_command(app, "compare", CompareOptions)(compare_cmd)
    options_command(app, "run", RunOptions)(run_cmd)


def _print_sweep(console, res: dict) -> None:
    from rich.table import Table

    t = Table(title=f"sweep: k={res['k']}->{res['k'] - 1} in layers l..r (base {res['base_score']:.4f})")
    t.add_column("l \\ r")
    rs = sorted({r["r"] for r in res["rows"]})
    for r in rs:
        t.add_column(str(r), justify="right")
    for l in sorted({r["l"] for r in res["rows"]}):
        cells = []
        for r in rs:
            row = next((x for x in res["rows"] if x["l"] == l and x["r"] == r), None)
            cells.append("" if row is None else f"{row['score']:.4g} ({100 * row['drop']:+.1f}%)")
        t.add_row(str(l), *cells)
    console.print(t)
