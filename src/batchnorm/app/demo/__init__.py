"""``batchnorm demo``: measure on the digits what batch normalization does to training.

Trains an MLP and a small CNN with and without BN over a learning-rate sweep and
several seeds, replicates Ioffe & Szegedy's (2015) Figure 1, and compares test-time
statistics (running averages against batch statistics). Prints a table and writes
``results.json`` and PNG figures to ``--out``. matplotlib, scikit-learn and tqdm
(the ``demo`` extra) are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from batchnorm.app.demo.report import jsonable, print_findings, summarize, table

if TYPE_CHECKING:
    from batchnorm.nn import Split

#: Sizes of the three presets; ``--quick`` for tests, ``--large`` for a longer look.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "lrs": [0.03, 0.3],
        "seeds": 2,
        "steps": 100,
        "eval_every": 10,
        "paper_steps": 300,
        "ema_steps": 60,
    },
    "default": {
        "lrs": [0.01, 0.03, 0.1, 0.3, 1.0],
        "seeds": 3,
        "steps": 400,
        "eval_every": 10,
        "paper_steps": 3000,
        "ema_steps": 300,
    },
    "large": {
        "lrs": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
        "seeds": 5,
        "steps": 1500,
        "eval_every": 10,
        "paper_steps": 10000,
        "ema_steps": 600,
    },
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="a small sweep (2 learning rates, 2 seeds, ~10 s)",
    )
    size.add_argument(
        "--large",
        action="store_true",
        help="a larger sweep (7 learning rates, 5 seeds, longer runs)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo-output"),
        help="directory for results.json and the figures (default ./demo-output)",
    )
    parser.add_argument(
        "--lrs",
        type=_learning_rates,
        help="comma-separated learning rates (overrides the preset)",
    )
    parser.add_argument("--seeds", type=int, help="seeds per configuration")
    parser.add_argument("--steps", type=int, help="SGD steps per sweep run")
    parser.add_argument(
        "--models",
        default="mlp,cnn",
        help="comma-separated subset of mlp,cnn (default both)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="mini-batch size of the sweep (default 32)",
    )
    parser.add_argument(
        "--shared-lr",
        type=float,
        default=0.1,
        help="learning rate of the loss-curve and drift figures",
    )
    parser.add_argument(
        "--target-accuracy",
        type=float,
        default=0.95,
        help="test accuracy for 'steps to target' (default 0.95)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="worker processes (default: 2 or the number of CPUs)",
    )
    parser.add_argument(
        "--backend",
        default="numpy",
        help="BatchNorm kernels, numpy or numba (default numpy: the arrays are tiny)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _learning_rates(text: str) -> list[float]:
    """``--lrs``: comma-separated numbers (their range is checked by :func:`_check`)."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"comma-separated numbers such as 0.01,0.1 expected; got {text!r}"
        ) from None


def _models(args: argparse.Namespace) -> list[str]:
    return [m.strip() for m in args.models.split(",") if m.strip()]


def _check(args: argparse.Namespace) -> str | None:
    """The first thing wrong with the arguments, as a one-line error; else None.

    Runs before anything is trained or written: each of these used to surface
    only after minutes of training, or not at all (a sweep of 0 seeds "worked").
    """
    lrs = args.lrs or []
    if args.lrs is not None and not all(math.isfinite(v) and v > 0 for v in lrs):
        return (
            "--lrs must be positive learning rates such as 0.01,0.1; got "
            f"{','.join(map(str, lrs))}. Drop the non-positive ones."
        )
    for flag, value in (("--seeds", args.seeds), ("--steps", args.steps)):
        if value is not None and value < 1:
            return f"{flag} must be at least 1; got {value}. Pass {flag} 1 or more."
    models = _models(args)
    if not models or set(models) - {"mlp", "cnn"}:
        return (
            f"--models must be a comma-separated subset of mlp,cnn; got "
            f"{args.models!r}. Pass --models mlp, cnn or mlp,cnn."
        )
    if args.batch_size < 2:
        return (
            f"--batch-size must be at least 2 (batch statistics of one sample are "
            f"undefined); got {args.batch_size}. Pass --batch-size 2 or more."
        )
    if not (math.isfinite(args.shared_lr) and args.shared_lr > 0):
        return (
            f"--shared-lr must be a positive learning rate; got {args.shared_lr}. "
            "Pass e.g. --shared-lr 0.1."
        )
    if not 0 < args.target_accuracy <= 1:
        return (
            "--target-accuracy must be a fraction in (0, 1]; got "
            f"{args.target_accuracy}. Pass e.g. --target-accuracy 0.95."
        )
    if args.jobs < 1:
        return f"--jobs must be at least 1; got {args.jobs}. Pass --jobs 1 or more."
    from batchnorm.kernels import BACKENDS

    if args.backend not in BACKENDS:
        return (
            f"--backend must be one of {', '.join(BACKENDS)}; got {args.backend!r}. "
            "The demo runs on the CPU; pass --backend numpy (or numba)."
        )
    return _check_out(args.out)


def _check_out(out: Path) -> str | None:
    """Whether ``--out`` is, or can become, a directory this process can write."""
    if out.exists() and not out.is_dir():
        return (
            f"--out must name a directory (created if missing); got {str(out)!r}, "
            "an existing file. Pass a new or existing directory."
        )
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        return (
            f"--out {str(out)!r} cannot be created: {str(existing)!r} is a file; got "
            "a path below a file. Pass a directory path."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        return (
            f"--out {str(out)!r} is not writable: no write permission in "
            f"{str(existing)!r}; got a read-only location. Pass a directory you "
            "can write."
        )
    return None


def _missing_extra(args: argparse.Namespace) -> str | None:
    from batchnorm.app.main import missing_modules

    needs = {
        "matplotlib": "matplotlib",
        "sklearn": "scikit-learn",
        "threadpoolctl": "threadpoolctl",
    }
    if args.backend == "numba":
        needs["numba"] = "numba"
    if not args.no_progress:
        needs["tqdm"] = "tqdm"
    alternative = "" if args.no_progress else " (or pass --no-progress)"
    return missing_modules(
        "demo", needs, "pip install 'batchnorm[demo]'", alternative=alternative
    )


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings: the preset with the arguments (checked by :func:`_check`)."""
    preset = "quick" if args.quick else "large" if args.large else "default"
    config: dict[str, Any] = {"preset": preset, **PRESETS[preset]}
    for key in ("lrs", "seeds", "steps"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    models = _models(args)
    shared = args.shared_lr
    if shared not in config["lrs"]:  # the closest swept rate on a log scale
        shared = min(config["lrs"], key=lambda lr: abs(math.log(lr / shared)))
    config.update(
        models=models,
        batch_size=args.batch_size,
        shared_lr=shared,
        target_accuracy=args.target_accuracy,
        sgd_momentum=0.9,
        weight_decay=5e-4,
        bn_momentum=0.9,
        max_loss=100.0,
        paper={"lr": 0.5, "batch_size": 60, "unit": 0, "sgd_momentum": 0.0},
        ema={"lr": 0.1, "batch_size": args.batch_size, "sgd_momentum": 0.9},
        backend=args.backend,
        jobs=args.jobs,
    )
    return config


def _tasks(config: dict[str, Any]) -> list[dict[str, Any]]:
    common = {
        "backend": config["backend"],
        "max_loss": config["max_loss"],
        "eval_every": config["eval_every"],
    }
    tasks: list[dict[str, Any]] = []
    for batch_norm in (False, True):  # the longest runs first keeps both workers busy
        tasks.append(
            {
                **common,
                "kind": "paper",
                "batch_norm": batch_norm,
                "seed": 0,
                "lr": config["paper"]["lr"],
                "steps": config["paper_steps"],
                "unit": config["paper"]["unit"],
                "eval_every": max(10, config["paper_steps"] // 100),
            }
        )
    for model in sorted(config["models"], key=lambda m: m != "cnn"):
        for lr in config["lrs"]:
            for batch_norm in (False, True):
                for seed in range(config["seeds"]):
                    tasks.append(
                        {
                            **common,
                            "kind": "sweep",
                            "model": model,
                            "lr": lr,
                            "batch_norm": batch_norm,
                            "seed": seed,
                            "steps": config["steps"],
                            "batch_size": config["batch_size"],
                            "momentum": config["sgd_momentum"],
                            "weight_decay": config["weight_decay"],
                            "bn_momentum": config["bn_momentum"],
                            "target_accuracy": config["target_accuracy"],
                            "drift": model == "mlp"
                            and lr == config["shared_lr"]
                            and seed == 0,
                        }
                    )
    tasks.append(
        {
            **common,
            "kind": "ema",
            "seed": 0,
            "lr": config["ema"]["lr"],
            "steps": config["ema_steps"],
            "batch_size": config["batch_size"],
            "momentum": config["ema"]["sgd_momentum"],
            "eval_every": 5,
        }
    )
    return tasks


class _NoBar:
    """Stands in for tqdm's bar under ``--no-progress``, so tqdm is not needed."""

    def update(self) -> None:
        pass

    def close(self) -> None:
        pass


def _execute(
    tasks: list[dict[str, Any]],
    config: dict[str, Any],
    progress: bool,
    data: Split | None = None,
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    from batchnorm.app.demo import experiments
    from batchnorm.nn import load_digits

    if data is None:
        data = load_digits(seed=0)
    bar: Any = _NoBar()
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="training runs", unit="run", file=sys.stderr)
    done: list[tuple[dict[str, Any], dict[str, Any]]] = []
    if config["jobs"] == 1:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):
            experiments.init_worker(data, single_thread_blas=False)
            for task in tasks:
                done.append(experiments.run_task(task))
                bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")  # no fork of a threaded BLAS
        with ProcessPoolExecutor(
            config["jobs"],
            mp_context=context,
            initializer=experiments.init_worker,
            initargs=(data,),
        ) as pool:
            futures = [pool.submit(experiments.run_task, task) for task in tasks]
            for future in as_completed(futures):
                done.append(future.result())
                bar.update()
    bar.close()
    return done


def run(args: argparse.Namespace) -> int:
    error = _check(args)
    if error is not None:
        print(f"batchnorm demo: error: {error}", file=sys.stderr)
        return 2
    missing = _missing_extra(args)
    if missing is not None:
        print(missing, file=sys.stderr)
        return 2
    from batchnorm.nn import load_digits

    data = load_digits(seed=0)
    if args.batch_size > len(data.x_train):
        print(
            "batchnorm demo: error: --batch-size must be at most the "
            f"{len(data.x_train)} training digits; got {args.batch_size}. Pass a "
            "smaller --batch-size.",
            file=sys.stderr,
        )
        return 2

    import batchnorm
    from batchnorm.app.demo import figures as _demo_figures

    start = time.perf_counter()
    config = _config(args)
    out: Path = args.out
    tasks = _tasks(config)
    print(
        f"batchnorm demo ({config['preset']}): {len(tasks)} training runs on the "
        f"scikit-learn digits, {config['jobs']} worker(s); writing to {out}/"
    )
    done = _execute(tasks, config, progress=not args.no_progress, data=data)

    runs: list[dict[str, Any]] = []
    drift: dict[str, Any] = {}
    paper: dict[str, Any] = {}
    ema: dict[str, Any] = {}
    for task, result in done:
        if task["kind"] == "sweep":
            record = {k: task[k] for k in ("model", "batch_norm", "lr", "seed")}
            record.update({k: v for k, v in result.items() if k != "drift"})
            record["loss"] = [
                None if v is None else round(v, 5) for v in record["loss"]
            ]
            runs.append(record)
            if "drift" in result:
                drift["with_bn" if task["batch_norm"] else "without_bn"] = result[
                    "drift"
                ]
        elif task["kind"] == "paper":
            paper["with_bn" if task["batch_norm"] else "without_bn"] = result
        else:
            ema = {**result, "lr": task["lr"], "batch_size": task["batch_size"]}
    runs.sort(key=lambda r: (r["model"], r["batch_norm"], r["lr"], r["seed"]))
    paper.update(
        unit=config["paper"]["unit"],
        lr=config["paper"]["lr"],
        batch_size=60,
        steps=config["paper_steps"],
    )
    summary = summarize(runs, config)
    results: dict[str, Any] = {
        "config": config,
        "environment": {
            "batchnorm": batchnorm.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "command": " ".join(["batchnorm", *sys.argv[1:]]),
        },
        "summary": summary,
        "paper_figure1": paper,
        "ema_vs_batch": ema,
        "drift": drift,
        "runs": runs,
    }
    print()
    print(table(summary, config))
    print()
    print_findings(results)
    out.mkdir(parents=True, exist_ok=True)
    results["figures"] = _demo_figures.write_all(results, out)
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    (out / "results.json").write_text(json.dumps(jsonable(results), indent=1) + "\n")
    print(
        f"\nwrote {out / 'results.json'} and {', '.join(results['figures'])} "
        f"in {results['wall_time_s']} s"
    )
    return 0
