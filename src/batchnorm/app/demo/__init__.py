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
from typing import Any

import numpy as np

from batchnorm.app.demo.report import jsonable, print_findings, summarize, table

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
        type=lambda s: [float(v) for v in s.split(",")],
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
        help="BatchNorm kernels (default numpy: the arrays are tiny)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config(args: argparse.Namespace) -> dict[str, Any]:
    preset = "quick" if args.quick else "large" if args.large else "default"
    config: dict[str, Any] = {"preset": preset, **PRESETS[preset]}
    for key in ("lrs", "seeds", "steps"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - {"mlp", "cnn"})
    if unknown or not models:
        raise SystemExit(f"--models must be a subset of mlp,cnn; got {args.models!r}")
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
        jobs=max(1, args.jobs),
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


def _execute(
    tasks: list[dict[str, Any]], config: dict[str, Any], progress: bool
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    from tqdm import tqdm

    from batchnorm.app.demo import experiments
    from batchnorm.nn import load_digits

    data = load_digits(seed=0)
    bar = tqdm(
        total=len(tasks),
        desc="training runs",
        unit="run",
        disable=not progress,
        file=sys.stderr,
    )
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
    import batchnorm
    from batchnorm.app.demo import figures as _demo_figures

    start = time.perf_counter()
    config = _config(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tasks = _tasks(config)
    print(
        f"batchnorm demo ({config['preset']}): {len(tasks)} training runs on the "
        f"scikit-learn digits, {config['jobs']} worker(s); writing to {out}/"
    )
    done = _execute(tasks, config, progress=not args.no_progress)

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
    results["figures"] = _demo_figures.write_all(results, out)
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    (out / "results.json").write_text(json.dumps(jsonable(results), indent=1) + "\n")
    print(
        f"\nwrote {out / 'results.json'} and {', '.join(results['figures'])} "
        f"in {results['wall_time_s']} s"
    )
    return 0
