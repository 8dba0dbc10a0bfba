"""Generated README sections: Markdown rendered from ``bench all`` and ``report`` results, spliced
between ``<!-- crystaltune:NAME -->`` and ``<!-- /crystaltune:NAME -->`` so no number is typed by hand."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from . import render
from .errors import CrystaltuneError
from .fmt import lower_or_higher, num


def splice(readme: str | Path, section: str, text: str) -> None:
    """Replace the marked section's body (append the section at the end when it has no markers yet)."""
    path = Path(readme)
    if not path.is_file():
        raise CrystaltuneError(f"--readme {readme}: no such file")
    old = path.read_text(encoding="utf-8")
    begin, end = f"<!-- crystaltune:{section} -->", f"<!-- /crystaltune:{section} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: block, old, count=1) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new, encoding="utf-8")


def _outcomes(f: dict[str, Any]) -> str:
    """'29 finished, 1 interrupted': how the search's trials ended (sections of older reports: finished only)."""
    parts = [f"{f['finished']} finished"] + [f"{f[k]} {k}" for k in ("interrupted", "failed") if f.get(k)]
    stopped = "; the search was stopped before its budget ended" if f.get("search_status") == "interrupted" else ""
    return ", ".join(parts) + stopped


def render_results(f: dict[str, Any]) -> str:
    """The README's summary of one search: provenance, timing, retraining comparison, top trials."""
    t, name = f["timing"], f["name"]
    out = [
        f"#### `{name}`: {f['crystals']} crystals, target {f['targets']}",
        "",
        f"Measured {f['date']} on {f['machine']}; {f['versions']}. Search run `{f['run_id']}`, "
        f"{f['trials']} trials ({_outcomes(f)}) x <= {f['max_epochs']} epochs, executor `{f['executor']}`: "
        f"`python -m crystaltune.search {f.get('space_arg', name)} --num-samples {f['num_samples']} "
        f"--max-epochs {f['max_epochs']} --seed {f.get('seed', 0)}`.",
        "",
        f"Search time: `tuner.fit` {t['tuner_s']:.0f} s, up to {t['concurrent_trials']} trials at a time; training "
        f"epochs {t['training_s']:.0f} s; **overhead {100 * t['overhead_fraction']:.1f}%** of the trial-slot time. "
        f"ASHA ran {t['epochs_run']} of {t['epochs_full_budget']} epochs "
        f"({100 * t['epochs_run'] / max(t['epochs_full_budget'], 1):.0f}%).",
        "",
    ]
    r = f.get("retrained") or {}
    if r:
        out += render.retrained_table(r, describe=_describe)
        if "improvement" in r:
            out += ["", render.improvement_sentence(r["improvement"])]
        out.append("")
    if f.get("final"):
        out += [*_final_lines(f["final"], r), ""]
    if f.get("target_mae") is not None and f["top"]:
        best, target = f["top"][0].test_mae, f["target_mae"]
        out += [f"Best trial's test MAE {num(best)} against the target <= {target:g}: **{_verdict(best, target)}**."]
        if f.get("final", {}).get("ensemble_test_mae") is not None:
            fin = f["final"]["ensemble_test_mae"]
            out += ["", f"The final model's test MAE {fin:.4f} against the target: **{_verdict(fin, target)}**."]
        elif "best" in r:
            rb = r["best"]
            out += [
                "",
                f"The best config retrained ({rb['params'].get('train.epochs')} epochs, "
                f"{len(rb['test_mae'])} seed(s)): "
                f"mean test MAE {rb['test_mae_mean']:.4f} against the target: "
                f"**{_verdict(rb['test_mae_mean'], target)}**.",
            ]
        out.append("")
    out += ["Top trials of the search (by val MAE):", "", *render.trial_table(f["top"], render.README_COLUMNS)]
    out += ["", f"Full report (TRAINING TABLE, parity plot, importances): `python -m crystaltune.report {name}`."]
    return "\n".join(out)


def _final_lines(final: dict[str, Any], r: dict[str, Any]) -> list[str]:
    """The search's final step: how the trial was chosen, and its seed ensemble against the default's."""
    sel = r.get("selection") or {}
    how = "chosen by mean val MAE over the seeds"
    if sel:
        folds = next(iter(sel.values()))["folds"]
        vals = ", ".join(f"{t} {v['val_mae_mean']:.4f}" for t, v in sel.items())
        how = f"chosen by {folds}-fold cross-validation on train + val (mean val MAE {vals})"
    if r.get("final_is_default"):
        how += (
            ": the well-trained default itself, kept by the one-standard-error rule (no candidate's mean val MAE "
            "was lower by more than one standard error)"
        )
    line = f"**Final model** (the search's final step): trial {final['trial']}, {how}, retrained over the seeds above."
    if final.get("ensemble_test_mae") is not None:
        line += (
            f" Its seed ensemble, registered as `{final['model_uri']}`: test MAE **{final['ensemble_test_mae']:.4f}**"
            f" against {final['default_ensemble_test_mae']:.4f} for the well-trained default's seed ensemble, "
            f"**{lower_or_higher(final['gain'])}**."
        )
    return [line]


def _verdict(mae: float, target: float) -> str:
    return "meets it" if mae <= target else f"misses it by {mae - target:.4f} ({100 * (mae / target - 1):.0f}% above)"


def _describe(p: dict[str, str]) -> str:
    """A one-line summary of a logged trial config."""
    bits = [
        f"`{p.get('model.name')}` {p.get('model.hidden')}/{p.get('model.head_hidden')}/{p.get('model.layers')}",
        f"{p.get('model.edge_featurizer')}/{p.get('model.node_featurizer')}",
        f"{p.get('model.pooling')} pooling",
        f"{p.get('loss.name')}{' + KL' if p.get('loss.kl') == 'True' else ''}",
        f"{p.get('optim.name')} lr {float(p.get('optim.lr', 'nan')):.2g}",
        f"{p.get('train.epochs')} epochs",
        f"batch {p.get('train.batch_size')}",
    ]
    gf = p.get("model.global_features", "[]")
    if gf not in ("[]", "", None):
        bits.append(f"global {gf}")
    return ", ".join(bits)


def render_performance(b: dict[str, Any]) -> str:
    """The README's Performance section body from a ``bench all`` JSON document."""
    g, tr = b["graphs"], b["train"]
    arch = next(iter(tr.values()))["architecture"]
    out = [
        f"Measured {b['date']} on {b['machine']}; {b['versions']}. Command: `{b['command']}`"
        + (" (quick sizes)" if b.get("quick") else "")
        + ".",
        "",
        "| measurement | result |",
        "|---|---|",
        f"| graph building, {g['crystals']} perovskites (cutoff {g['cutoff']} Å, {g['max_neighbors']} neighbours) | "
        f"{g['ours_structures_per_s']:.0f} structures/s vs "
        f"{g['pymatgen_get_all_neighbors_structures_per_s']:.1f} with pymatgen "
        f"`get_all_neighbors`: **{g['ratio']:.1f}x** |",
        f"| load the preprocessed perov5 graphs ({b['cache_load_perov5_crystals']} crystals) from the cache | "
        f"{b['cache_load_perov5_s']:.2f} s |",
    ]
    ref = tr.get("cgcnn", {}).get("reference_code_graphs_per_s")
    if ref:
        out.append(
            f"| cgcnn training vs the reference CGCNN code itself (its `main.py`, same crystals, batch and "
            f"threads, run in the same command) | {tr['cgcnn']['graphs_per_s']:.0f} vs {ref:.0f} graphs/s: "
            f"**{tr['cgcnn']['graphs_per_s'] / ref:.1f}x** |"
        )
    else:
        out.append("| cgcnn training vs the reference CGCNN code | not measured in this run (`--reference-code DIR`) |")
    d = b["ddp"]
    out.append(
        f"| DDP through Ray Train, 1 -> 2 CPU workers (gloo) | {d['workers_1']['graphs_per_s_last_epoch']:.0f} -> "
        f"{d['workers_2']['graphs_per_s_last_epoch']:.0f} graphs/s ({d['speedup']:.2f}x) |"
    )
    for s in b.get("searches", []):
        out.append(
            f"| `python -m crystaltune.search {s['space']}` ({s['trials']} trials, executor `{s['executor']}`, "
            f"{s['concurrent_trials']} at a time) | {s['wall_s']:.0f} s wall; "
            f"overhead **{100 * s['overhead_fraction']:.1f}%** "
            f"of {s['tuner_s']:.0f} s x {s['concurrent_trials']} trial slots; ASHA ran {s['epochs_run']} of "
            f"{s['epochs_full_budget']} epochs; best test MAE {num(s.get('best_test_mae'))} |"
        )
    out += [
        "",
        f"Training throughput per model (batch {b['train_batch_size']}, {b['train_threads']} threads, "
        f"hidden {arch['hidden']}/{arch['head_hidden']}, {arch['layers']} layers; graphs/s excluding the first epoch):",
        "",
        "| model | graphs/s | peak RSS MB |",
        "|---|---|---|",
    ]
    if ref:
        out.append(f"| reference CGCNN code (`main.py`) | {ref:.0f} | - |")
    for m, r in tr.items():
        out.append(f"| `{m}` | {r['graphs_per_s']:.0f} | {r.get('peak_rss_mb', float('nan')):.0f} |")
    gpu = b.get("gpu")
    if gpu:
        out += ["", "GPU:", "", "| model | precision | graphs/s | peak GPU MB |", "|---|---|---|---|"]
        for k, r in gpu.items():
            m, prec = k.rsplit("_", 1)
            out.append(f"| `{m}` | {prec} | {r['graphs_per_s']:.0f} | {r.get('peak_cuda_mb', float('nan')):.0f} |")
    else:
        out += [
            "",
            "GPU figures: none in this run (no CUDA device); `scripts/gpu_check.sh` measures them on a GPU machine.",
        ]
    return "\n".join(out)


def render_gpu(b: dict[str, Any]) -> str:
    """The README's GPU section from a ``bench gpu`` JSON document (or the statement that none ran)."""
    if not b.get("device"):
        return "GPU figures: not measured on a GPU yet (`python -m crystaltune.bench gpu --readme README.md` on one)."
    out = [
        f"Measured on {b['device']}" + (" (quick sizes)" if b.get("quick") else "") + ".",
        "",
        "| run | graphs/s | peak GPU MB |",
        "|---|---|---|",
    ]
    out += [f"| `{k}` | {r['graphs_per_s']:.0f} | {num(r.get('peak_cuda_mb'), 0)} |" for k, r in b["single"].items()]
    for model, runs in b["packed"].items():
        out += [
            f"| `{model}` x {r['trials']} packed trials (batch 256) | {r['graphs_per_s_total']:.0f} in total | "
            f"{', '.join(num(m, 0) for m in r['peak_cuda_mb'])} |"
            for r in runs
        ]
    if b.get("reference_code"):
        r = b["reference_code"]
        out.append(
            f"| reference CGCNN code on the same GPU vs cgcnn | {r['reference']:.0f} vs {r['ours']:.0f}: "
            f"**{r['ratio']:.1f}x** | - |"
        )
    return "\n".join(out)
