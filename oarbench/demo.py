"""The whole analysis on the synthetic two-centre study: ``oarbench demo``.

Layout of ``OUT``::

    OUT/study/      the generated study (nnU-Net raw datasets, metadata, predictions, study.toml)
    OUT/results/    metrics.csv, summary.csv, run.json, absent*.csv, robustness*.csv,
                    stats.csv, gallery/, report.html

Each step reads only what the steps before it wrote, so every step is also a
command of its own (docs/demo.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["run_demo"]


def run_demo(
    out_dir: str | Path,
    *,
    config: str | Path | None = None,
    workers: int = 2,
    force: bool = False,
    gallery_k: int = 2,
    log: Callable[[str], Any] = print,
) -> dict[str, Path]:
    """Generate the demo study (if absent) and run every analysis step on it.

    Returns the paths of the main outputs. ``config`` is a study TOML with
    ``[phantoms]`` and ``[error_model]`` sections (default: cases/demo.toml).
    """
    from oarbench.evaluate import EvalOptions, evaluate_jobs, jobs_from_study, write_outputs
    from oarbench.phantoms import generate_study, load_demo_config
    from oarbench.study import load_study

    out_dir = Path(out_dir)
    results = out_dir / "results"
    timings: dict[str, float] = {}

    def step(name: str) -> Callable[[], None]:
        start = time.perf_counter()
        log(f"[demo] {name} ...")

        def done() -> None:
            timings[name] = round(time.perf_counter() - start, 2)
            log(f"[demo] {name}: {timings[name]:.1f} s")

        return done

    done = step("phantoms")
    cfg = load_demo_config(config)
    paths = generate_study(out_dir / "study", cfg, force=force)
    study = load_study(paths.study_toml)
    done()

    done = step("evaluate")
    options = EvalOptions(labels=study.labels, tolerance_mm=study.tolerance_mm)
    table, provenance = evaluate_jobs(jobs_from_study(study), options, results, workers=workers, force=force, progress=False)
    provenance["command"] = "demo"
    provenance["study"] = str(paths.study_toml)
    write_outputs(results, table, provenance)
    done()

    outputs: dict[str, Path] = {"study": paths.study_toml, "metrics": results / "metrics.csv"}

    done = step("false-positive kidneys after nephrectomy")
    from oarbench.absent import analyse_study_absent, write_absent

    absent = analyse_study_absent(study, warn=log)
    written = write_absent(absent, results)
    outputs["absent"] = written["absent.csv"]
    done()

    done = step("statistics")
    from oarbench.stats import run_stats, write_stats

    stats = run_stats(table, margins={"dsc": 0.01, "hd95": 1.0}, source=str(results / "metrics.csv"))
    outputs["stats"] = write_stats(stats, results / "stats.csv")
    done()

    done = step("gallery")
    from oarbench.gallery import PathResolver, build_gallery

    build_gallery(table, PathResolver.from_study(paths.study_toml), results / "gallery", k=gallery_k,
                  source=str(results / "metrics.csv"))
    outputs["gallery"] = results / "gallery"
    done()

    done = step("report")
    from oarbench.report import build_report

    outputs["report"] = build_report(
        results,
        table,
        stats=stats,
        absent=outputs.get("absent"),
        gallery_dir=results / "gallery",
        provenance={**provenance, "demo_step_seconds": timings},
        title="oarbench demo: synthetic two-centre paediatric study",
    )
    done()
    return outputs
