"""Float32 accuracy at large means: ours (every available backend) beside PyTorch.

For float32 data with standard deviation 1 and means 0, 1e4 and 1e6 in three
layouts (NCHW (32, 16, 28, 28) with axis=1; the same data channels-last (NHWC,
axis=-1; torch's ``channels_last`` memory format); (N, C) = (4096, 64)), measure

- the max relative error of the per-channel biased batch variance, and
- the max absolute error of ``y = (x − μ)/√(σ² + ε)`` (γ = 1, β = 0, ε = 1e-5),

against a float64 reference computed on the same float32 values. Torch's batch
variance is the one its ``batch_norm`` kernel computes: read back from the
running-variance update with ``momentum=1.0`` (which stores the unbiased batch
variance) and converted to biased with ``× (m − 1)/m`` in float64.
``torch.var_mean`` in float32 on the same layout is shown as a second torch row.

Run::

    python benchmarks/accuracy.py            # prints the table, writes ACCURACY.md
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np

import batchnorm
from batchnorm import functional as F
from batchnorm import kernels

EPS = 1e-5
MEANS = (0.0, 1e4, 1e6)
NCHW_SHAPE = (32, 16, 28, 28)
NC_SHAPE = (4096, 64)
HERE = Path(__file__).resolve().parent


def make_data(shape: tuple[int, ...], mean: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (mean + rng.standard_normal(shape)).astype(np.float32)


def reference(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Biased variance and y on the float32 values, in extended precision.

    ``np.longdouble`` (64-bit significand on x86-64; float64 elsewhere) so that the
    reference is at least float64-accurate and not the same float64 two-pass
    arithmetic our NumPy backend uses.
    """
    x64 = x.astype(np.longdouble)
    axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    mean = x64.mean(axis=axes, keepdims=True)
    var = x64.var(axis=axes, keepdims=True)
    y = (x64 - mean) / np.sqrt(var + EPS)
    return var.ravel(), y


def as_row(layout: str, mean: float, impl: str, var_err: float, y_err) -> dict:
    return {"layout": layout, "mean": mean, "impl": impl, "var": var_err, "y": y_err}


def var_error(var, var_ref) -> float:
    return float(np.max(np.abs(np.asarray(var, np.longdouble) - var_ref) / var_ref))


def y_error(y, y_ref) -> float:
    return float(np.max(np.abs(np.asarray(y, np.longdouble) - y_ref)))


def torch_batch_norm(torch, x_t, num_channels: int, count: int):
    """Variance as torch's batch_norm kernel computes it, its output, and a check.

    The check is the largest relative difference between that variance and the
    one implied by the kernel's saved ``invstd`` (``1/invstd² − ε``, from
    ``aten.native_batch_norm``): small means the running-variance path reports
    the variance the kernel normalized with.
    """
    running_mean = torch.zeros(num_channels, dtype=torch.float32)
    running_var = torch.ones(num_channels, dtype=torch.float32)
    y = torch.nn.functional.batch_norm(
        x_t, running_mean, running_var, None, None, True, 1.0, EPS
    )
    biased = running_var.double().numpy() * (count - 1) / count
    _, _, invstd = torch.ops.aten.native_batch_norm(
        x_t, None, None, None, None, True, 0.0, EPS
    )
    from_invstd = 1.0 / invstd.double().numpy() ** 2 - EPS
    check = float(np.max(np.abs(biased - from_invstd) / from_invstd))
    return biased, y, check


def cases():
    """(layout, our x, our axis, torch-layout builder) with shared NCHW data."""
    for i, mean in enumerate(MEANS):
        x_nchw = make_data(NCHW_SHAPE, mean, seed=i)
        x_nhwc = np.ascontiguousarray(np.moveaxis(x_nchw, 1, -1))
        x_nc = make_data(NC_SHAPE, mean, seed=10 + i)
        yield "NCHW", mean, x_nchw, 1, x_nchw, False
        yield "NHWC", mean, x_nhwc, -1, x_nchw, True
        yield "(N,C)", mean, x_nc, 1, x_nc, False


def measure(backends, torch) -> list[dict]:
    rows = []
    for layout, mean, x, axis, x_torch_src, channels_last in cases():
        var_ref, y_ref = reference(x, axis)
        count = x.size // x.shape[axis]
        for backend in backends:
            F.forward_train(x, None, None, axis=axis, eps=EPS, backend=backend)  # warm
            y, cache = F.forward_train(
                x, None, None, axis=axis, eps=EPS, backend=backend
            )
            rows.append(
                as_row(
                    layout,
                    mean,
                    f"ours ({backend})",
                    var_error(cache.var, var_ref),
                    y_error(y, y_ref),
                )
            )
        if torch is None:
            continue
        x_t = torch.from_numpy(x_torch_src)
        if channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        var_t, y_t, check = torch_batch_norm(torch, x_t, x.shape[axis], count)
        y_np = y_t.numpy()
        if channels_last:  # back to our NHWC element order for the comparison
            y_np = np.moveaxis(y_np, 1, -1)
        rows.append(
            as_row(
                layout,
                mean,
                "torch batch_norm",
                var_error(var_t, var_ref),
                y_error(y_np, y_ref),
            )
            | {"kernel_check": check}
        )
        dims = [d for d in range(x_t.ndim) if d != 1]
        var_vm, _ = torch.var_mean(x_t, dim=dims, correction=0)
        rows.append(
            as_row(
                layout,
                mean,
                "torch.var_mean (f32)",
                var_error(var_vm.double().numpy(), var_ref),
                None,
            )
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| layout | mean | implementation | var max rel err | y max abs err |",
        "|---|---:|---|---:|---:|",
    ]
    for r in rows:
        y = "—" if r["y"] is None else f"{r['y']:.1e}"
        lines.append(
            f"| {r['layout']} | {r['mean']:g} | {r['impl']} | {r['var']:.1e} | {y} |"
        )
    return "\n".join(lines)


def versions(torch) -> str:
    parts = [
        f"python {platform.python_version()}",
        f"numpy {np.__version__}",
        f"batchnorm {batchnorm.__version__}",
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
        if torch is not None
        else "torch not installed",
    ]
    try:
        import numba

        parts.append(f"numba {numba.__version__}")
    except ImportError:
        pass
    parts.append(f"batchnorm backends measured: {', '.join(kernels.available())}")
    machine = f"{platform.system()} {platform.machine()}, {platform.processor() or ''}"
    return ", ".join(parts) + f"; {machine.strip(', ')}"


def worst(rows: list[dict], key: str, impl: str, **where) -> float:
    values = [
        r[key]
        for r in rows
        if r["impl"].startswith(impl) and all(r[k] == v for k, v in where.items())
    ]
    return max(values) if values else float("nan")


def interpretation(rows: list[dict], torch_name: str) -> str:
    """Honest reading of the table, with the numbers taken from it."""
    ours_var, ours_y = worst(rows, "var", "ours"), worst(rows, "y", "ours")
    lines = [
        "## Interpretation",
        "",
        "- **Reference.** Statistics and output computed in extended precision "
        "(`np.longdouble`) on the *same* float32 values, so the errors measure "
        "arithmetic, not the quantization of the inputs (at mean 1e6 float32 "
        "inputs lie on a 0.0625 grid; both libraries see the same grid).",
        "- **Output floor.** Here |y| < 8, so a float32 output cannot be closer "
        "than half a unit in the last place, 2⁻²⁴·|y| ≤ 2.4e-7 for |y| in [2, 4) "
        "and ≤ 4.8e-7 above; an error at that level is the rounding of the result.",
        f"- **Ours**: worst variance error {ours_var:.1e} and worst output error "
        f"{ours_y:.1e} over every layout and mean: statistics accumulated in float64 "
        "without E[x²] − E[x]², and `(x − μ)·(γ·inv_std) + β` rounded once "
        "to float32, so the output sits at the float32 floor whatever the mean.",
    ]
    if any(r["impl"].startswith("torch") for r in rows):

        def t(key, layout, mean):
            return worst(rows, key, "torch batch_norm", layout=layout, mean=mean)

        check = worst(rows, "kernel_check", "torch batch_norm")
        lines += [
            f"- **Torch** ({torch_name}, CPU) gives different results per memory "
            "layout on the same data. Contiguous NCHW: the variance stays usable "
            "(relative error "
            f"{t('var', 'NCHW', 1e4):.1e} at mean 1e4, {t('var', 'NCHW', 1e6):.1e} "
            "at 1e6) but the output error grows with the mean, "
            f"{t('y', 'NCHW', 0.0):.1e} → {t('y', 'NCHW', 1e4):.1e} → "
            f"{t('y', 'NCHW', 1e6):.1e}, consistent with normalizing with the "
            "folded `x·a + (β − μ·a)` in float32, whose terms are of size |μ|/σ "
            "and cancel.",
            "- Channels-last (NHWC) and (N,C) input lose the variance itself: "
            f"relative error {t('var', 'NHWC', 1e4):.1e} / "
            f"{t('var', '(N,C)', 1e4):.1e} at mean 1e4 and "
            f"{t('var', 'NHWC', 1e6):.1e} / {t('var', '(N,C)', 1e6):.1e} at 1e6 "
            "(meaningless), and with it the output "
            f"({t('y', 'NHWC', 1e6):.1e} / {t('y', '(N,C)', 1e6):.1e} at 1e6). "
            "Even at mean 0 their variance is "
            f"{t('var', 'NHWC', 0.0) / t('var', 'NCHW', 0.0):.0f}x / "
            f"{t('var', '(N,C)', 0.0) / t('var', 'NCHW', 0.0):.0f}x less accurate "
            "than the NCHW path's. We did not read torch's kernels; the numbers "
            "are consistent with statistics accumulated in float32 on these "
            "paths, but we only measured, not traced, the cause.",
            "- `torch.var_mean` in float32 is accurate in every layout (≤ "
            f"{worst(rows, 'var', 'torch.var_mean'):.1e}), so the loss is in "
            "`batch_norm`'s kernels, not in float32 itself.",
            "- Torch's variance here is the running variance after one update with "
            "momentum=1.0, converted to biased. It agrees with the variance implied "
            "by the kernel's saved inverse standard deviation "
            f"(`aten.native_batch_norm`) to {check:.1e} relative in every case, "
            "so it is the variance torch normalized with.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output", type=Path, default=HERE / "ACCURACY.md", help="results file"
    )
    parser.add_argument("--no-torch", action="store_true", help="ours only")
    args = parser.parse_args(argv)
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("torch is not installed: measuring ours only", file=sys.stderr)
    rows = measure(kernels.available(), torch)
    markdown = table(rows)
    print(markdown)
    command = "python benchmarks/accuracy.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    torch_name = f"torch {torch.__version__}" if torch is not None else "torch"
    report = "\n\n".join(
        [
            "# Float32 accuracy at large means: batchnorm vs PyTorch",
            f"Made by `{command.strip()}`.\n\n{versions(torch)}.",
            (
                "float32 input, standard deviation 1, every channel at the listed "
                f"mean; NCHW {NCHW_SHAPE} (axis=1), the same data as NHWC "
                f"(axis=-1; torch `channels_last`), (N,C) {NC_SHAPE}. "
                f"ε = {EPS:g}, γ = 1, β = 0. Max relative error of the per-channel "
                "biased batch variance and max absolute error of y, against a "
                "reference on the same float32 values. Torch's variance is what "
                "its `batch_norm` kernel computes (running variance after one "
                "update with momentum=1.0, × (m − 1)/m)."
            ),
            markdown,
            interpretation(rows, torch_name),
        ]
    )
    args.output.write_text(report)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
