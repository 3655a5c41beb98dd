"""detr-jax against PyTorch on one accelerator (GPU/TPU; any backend with --smoke), in one command.

On the lent GPU machine (it has jax with CUDA, torch, torchvision, timm and transformers; no
network; detr_jax is not installed there, so the repository runs from its checkout):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/accelerator.py --out $OUT      # at most --budget 470 s
    python bench/accelerator.py --smoke --out /tmp/acc           # every case, tiny, any backend (< 2 min on a CPU)

It writes `accelerator.md` (the tables, also printed) and `accelerator.json` (every number) to
--out (default bench/results/, git-ignored).  Weights: the fixture recipe
(`tests/data/make_checkpoint.py`, seed 20, numpy only), as `bench/compare_torch.py`: R50-DC5
panoptic (250 classes) and R50 detection (the recipe without the mask head, 91 classes).  Inputs:
random normal images, no padding.

Cases (each framework in subprocesses of its own, so that peak memory is its own):
  inference  R50 detection and R50-DC5 panoptic (all queries' masks) at 800x1066, batch 1 and 8,
             float32 and bf16:
               jax            `DETRModel(..., policy="accelerator", dtype=...)`: dense attention, the
                              batch in one program; bf16 compute with float32 parameters
               torch          `bench/torch_detr.py` eager, `torch.inference_mode`; bf16 as
                              `torch.autocast(dtype=torch.bfloat16)`; cudnn.benchmark on
               torch_compile  the same module under `torch.compile(dynamic=False)` (batch 8, float32
                              by default: `--compile-batches`, `--compile-dtypes`); a failure is
                              reported, not fatal
               hf             Hugging Face's DetrForObjectDetection / DetrForSegmentation
                              (`bench/hf_detr.py`: timm ResNet-50, the same weights), eager,
                              autocast for bf16; skipped, with the reason, where transformers or
                              timm is not importable
  train      one train step of R50-DC5 panoptic with Hungarian matching, random init, batch of
             512x683 images with 20 objects each, at the largest batch that fits among
             --train-batches (tried largest first; OOM caught): jax `make_train_step` under the
             accelerator policy (float32), torch the original's step (`bench_train_step.py`:
             SetCriterion, AdamW, clipping) starting at jax's batch.
Numbers: images/s (batch / median of --repeats timed calls after one untimed warm-up call),
compile s (first call minus the median: jit compilation, torch.compile, cudnn autotuning), peak
device memory (jax `memory_stats()["peak_bytes_in_use"]`, torch `max_memory_allocated`; where a
backend has no such figure, the CPU, the process's peak RSS, marked "RSS"; a jax worker runs its
batches smallest first and its train search largest first, so a failed larger train batch can
raise the peak of the one that fits), and the fraction of
the device's peak FLOP/s: FLOPs from XLA's cost analysis of the jax program
(`common.model_gflops` / the lowered train step; the torch cases do the same arithmetic and are
given the same count), the peak from a matmul measured in the same run by each framework in each
dtype (n = 8192 on an accelerator; as each framework runs float32 by default: JAX lets cuBLAS use
TF32, torch does not, `torch.backends.cuda.matmul.allow_tf32` is False), the best of the two.
Datasheet dense peaks for known devices (`DATASHEET_TFLOPS`) are printed beside it.
Each framework keeps its own float32 defaults (JAX's TF32 matmuls and convolutions, torch's TF32
convolutions and full float32 matmuls), as their users get them; the JSON records the flags.

`--smoke`: every case at 64x96 (train 64x96), batch 2, 2 repeats, no time budget.  The detr-jax side then
runs `detr_tiny`-sized models (random init; compiling R50 eight times takes minutes on a busy CPU)
while the PyTorch side keeps the R50 recipe (eager R50 at 64x96 takes milliseconds), and
torch.compile uses its "eager" backend (graph capture only; inductor compiles for minutes on a
CPU), and torch one thread (on a 2-core CPU shared with other jobs, one R50-DC5 train step at
64x96 took 165 s with torch's default two threads at load ~17, 1.9 s with one thread at load
~6-11): smoke numbers check that every case runs and reports, they compare nothing.

The run stays inside `--budget` seconds (default 470): a job still running then is stopped and
its cases reported as timed out, later ones as skipped; the jobs run in the order of `plan()`.  If the budget cut cases
off, a second command runs just those: `--only train,inference:torch_compile` (KIND:FRAMEWORK
prefixes; the matmul peaks always run).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional, Sequence

BENCH = pathlib.Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]
import common  # noqa: E402

SEED = 20
DETECTION_CLASSES = 91
PANOPTIC_CLASSES = 250
OBJECTS = 20                    # objects per training image (bench_train_step.py's)
DATASHEET_TFLOPS = {            # dense, SXM parts, vendor datasheets: (bfloat16, tf32, float32)
    "H200": (989, 494, 67), "H100": (989, 494, 67), "A100": (312, 156, 19.5)}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the run measures: image sizes, batches, repeats, models."""

    height: int = 800
    width: int = 1066
    batches: Sequence[int] = (1, 8)
    dtypes: Sequence[str] = ("float32", "bfloat16")
    train_height: int = 512
    train_width: int = 683
    train_batches: Sequence[int] = (32, 16, 8, 4, 2)
    compile_batches: Sequence[int] = (8,)
    compile_dtypes: Sequence[str] = ("float32",)
    repeats: int = 10
    train_repeats: int = 5
    matmul_n: int = 8192
    tiny_jax: bool = False          # --smoke: detr_tiny-sized detr-jax models
    torch_threads: Optional[int] = None   # torch.set_num_threads in the workers (None: torch's default)
    compile_backend: str = "inductor"


SMOKE = Sizes(height=64, width=96, batches=(2,), train_height=64, train_width=96, train_batches=(2, 1),
              compile_batches=(2,), repeats=2, train_repeats=1, matmul_n=256, tiny_jax=True,
              compile_backend="eager", torch_threads=1)


# ---------------------------------------------------------------------------------------------
# Weights and inputs
# ---------------------------------------------------------------------------------------------
def recipe_state_dict(panoptic: bool):
    """The recipe (original keys): R50-DC5 panoptic, or R50 detection (`detr.` stripped, mask head
    dropped, class_embed redrawn for 91 classes: bench/compare_torch.py's `detection_state_dict`)."""
    from compare_torch import detection_state_dict

    spec = importlib.util.spec_from_file_location("detr_recipe", REPO / "tests" / "data" / "make_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sd = module.make_state_dict(SEED)
    return sd if panoptic else detection_state_dict(sd, DETECTION_CLASSES)


def images(batch: int, height: int, width: int):
    """(float32 [B, H, W, 3] normal noise, bool [B, H, W] all True): no padding."""
    import numpy as np

    rng = np.random.default_rng(batch)
    return rng.standard_normal((batch, height, width, 3)).astype(np.float32), np.ones((batch, height, width), bool)


def device_memory_jax() -> Dict[str, object]:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"peak_memory_mb": stats["peak_bytes_in_use"] / 2 ** 20, "memory_kind": "device"}
    return {"peak_memory_mb": common.peak_rss_mb(), "memory_kind": "RSS"}


def device_memory_torch(device) -> Dict[str, object]:
    import torch

    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20, "memory_kind": "device"}
    return {"peak_memory_mb": common.peak_rss_mb(), "memory_kind": "RSS"}


def is_oom(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "OutOfMemory", "out of memory", "Out of memory"))


def timed(call, repeats: int) -> Dict[str, float]:
    """`common.time_calls` with one untimed warm-up; compile_s = first call - median."""
    t = common.time_calls(call, repeats, warmup=1)
    t.pop("runs_s")
    t["compile_s"] = max(t["first_s"] - t["median_s"], 0.0)
    return t


# ---------------------------------------------------------------------------------------------
# Workers (each runs in a subprocess and returns a list of result rows)
# ---------------------------------------------------------------------------------------------
def matmul_peaks(framework: str, n: int) -> List[Dict[str, object]]:
    """TFLOP/s of an n^3 matmul on random data, float32 (the framework's default precision) and bf16."""
    rows = []
    for dtype in ("float32", "bfloat16"):
        if framework == "jax":
            import jax
            import jax.numpy as jnp

            a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
            f = jax.jit(jnp.dot)
            call = lambda: f(a, a).block_until_ready()  # noqa: E731
            device = jax.devices()[0].device_kind
        else:
            import torch

            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            a = torch.randn(n, n, device=dev, dtype=getattr(torch, dtype))
            call = lambda: (torch.mm(a, a), dev.type == "cuda" and torch.cuda.synchronize())  # noqa: E731
            device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        t = common.time_calls(call, 5, warmup=2)
        rows.append({"kind": "matmul", "framework": framework, "dtype": dtype, "n": n, "device": device,
                     "tflops": 2 * n ** 3 / t["median_s"] / 1e12})
    return rows


def jax_inference(model: str, dtype: str, sizes: Sizes) -> List[Dict[str, object]]:
    import jax

    from detr_jax.runtime import DETRModel

    panoptic = model == "panoptic"
    if sizes.tiny_jax:
        from detr_jax.config import load_config
        from detr_jax.models import init_variables

        config = dataclasses.replace(load_config("detr_tiny").model, masks=panoptic)
        variables = init_variables(config, jax.random.PRNGKey(0))
    else:
        from detr_jax import convert

        sd = recipe_state_dict(panoptic)
        config = convert.infer_config(convert.canonical_state_dict(sd), {"name": "dc5" if panoptic else ""})
        variables = convert.convert_state_dict(sd, config)
    runner = DETRModel(config, jax.device_put(variables), policy="accelerator", dtype=dtype)
    rows = []
    for batch in sizes.batches:        # ascending: the process's peak after a case is that case's
        x, valid = (jax.device_put(a) for a in images(batch, sizes.height, sizes.width))
        row = {"kind": "inference", "framework": "jax", "model": model, "dtype": dtype, "batch": batch,
               "size": f"{sizes.height}x{sizes.width}", "config": repr(runner)}
        row.update(timed(lambda: jax.block_until_ready(runner(x, valid)), sizes.repeats))
        row["gflops"] = common.model_gflops(runner.module, runner.variables, x, valid)
        row.update(device_memory_jax())
        rows.append(row)
    return rows


def torch_model(framework: str, model: str, device):
    """The PyTorch model of a framework ("torch", "torch_compile": bench/torch_detr.py; "hf") in
    float32 on `device`, eval mode, recipe weights."""
    panoptic = model == "panoptic"
    sd = recipe_state_dict(panoptic)
    classes = PANOPTIC_CLASSES if panoptic else DETECTION_CLASSES
    if framework == "hf":
        import hf_detr

        net = hf_detr.load_original(hf_detr.build_hf_detr(panoptic, classes), sd)
    else:
        import torch_detr

        net = torch_detr.load_state_dict(torch_detr.build_detr("resnet50", dilation=panoptic, masks=panoptic,
                                                               num_classes=classes).eval(), sd)
    return net.to(device).eval()


def hf_missing() -> List[str]:
    """The packages that Hugging Face's DETR needs and this interpreter cannot import."""
    return [m for m in ("transformers", "timm") if importlib.util.find_spec(m) is None]


def torch_inference(framework: str, model: str, sizes: Sizes) -> List[Dict[str, object]]:
    import contextlib

    base = {"kind": "inference", "framework": framework, "model": model, "size": f"{sizes.height}x{sizes.width}"}
    missing = hf_missing() if framework == "hf" else []
    if missing:
        return [dict(base, dtype=d, batch=b, skipped=f"{' and '.join(missing)} not importable here")
                for d in sizes.dtypes for b in sizes.batches]
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    net = torch_model(framework, model, device)
    batches = sizes.compile_batches if framework == "torch_compile" else sizes.batches
    rows = []
    for dtype in sizes.compile_dtypes if framework == "torch_compile" else sizes.dtypes:
        if framework == "torch_compile":
            import torch._dynamo

            torch._dynamo.reset()
            forward = torch.compile(net, dynamic=False, backend=sizes.compile_backend)
        else:
            forward = net
        for batch in batches:
            row = dict(base, dtype=dtype, batch=batch)
            if framework == "torch_compile":
                row["compile_backend"] = sizes.compile_backend
            x, valid = images(batch, sizes.height, sizes.width)
            x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)
            valid = torch.from_numpy(valid).to(device)
            autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                        else contextlib.nullcontext())

            def call():
                with torch.inference_mode(), autocast:
                    out = (forward(pixel_values=x, pixel_mask=valid.long()) if framework == "hf"
                           else forward(x, ~valid))          # torch_detr: True on padding
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return out

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                row.update(timed(call, sizes.repeats))
                row.update(device_memory_torch(device))
            except Exception as error:   # torch.compile failing is a result, reported in the table
                row["error"] = f"{type(error).__name__}: {error}"[:1500]
                row["traceback"] = traceback.format_exc()[-3000:]
            rows.append(row)
    return rows


def jax_train(sizes: Sizes, batches: Sequence[int]) -> List[Dict[str, object]]:
    import jax
    import numpy as np

    import bench_train_step
    from detr_jax import optim
    from detr_jax.config import load_config
    from detr_jax.data.loader import target_slots
    from detr_jax.models.detr import DETR, init_variables
    from detr_jax.train import make_train_step, stage_configs
    from detr_jax.train_state import create_train_state

    name = "detr_tiny" if sizes.tiny_jax else "detr_r50_dc5_panoptic"
    config = load_config(name)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, stage="all"))
    model_config, loss_config = stage_configs(config, "accelerator")
    variables = jax.tree.map(np.asarray, init_variables(model_config, jax.random.PRNGKey(0)))
    optimizer = optim.make_optimizer(variables["params"], config.train, steps_per_epoch=1000)
    step = make_train_step(DETR(model_config), loss_config, optimizer, optim.lr_schedule(config.train.lr, config.train, 1000),
                           optim.trainable_mask(variables["params"], config.train), axis_name=None)
    rows = []
    for batch_size in batches:          # largest first: the first that fits is the answer
        row = {"kind": "train", "framework": "jax", "model": "panoptic", "dtype": "float32", "batch": batch_size,
               "size": f"{sizes.train_height}x{sizes.train_width}", "config": name}
        state = batch = compiled = holder = None
        try:
            batch = bench_train_step.make_batch(batch_size, sizes.train_height, sizes.train_width,
                                                target_slots(OBJECTS, config.data))
            batch["labels"] %= model_config.num_classes       # make_batch draws COCO panoptic's 250
            state = jax.device_put(create_train_state(variables, optimizer))
            batch = jax.device_put(batch)
            rng = jax.device_put(np.asarray(jax.random.PRNGKey(1)))
            start = time.perf_counter()
            lowered = jax.jit(step, donate_argnums=(0,)).lower(state, batch, rng)
            cost = lowered.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            compiled = lowered.compile()
            compile_s = time.perf_counter() - start
            holder = [state]

            def call():
                holder[0], metrics = compiled(holder[0], batch, rng)
                return jax.block_until_ready(metrics)

            row.update(timed(call, sizes.train_repeats))
            row.update(compile_s=compile_s, gflops=float(cost.get("flops", float("nan"))) / 1e9,
                       loss=float(call()["loss"]))
            row.update(device_memory_jax())
            rows.append(row)
            return rows
        except Exception as error:
            if not is_oom(error):
                raise
            rows.append(dict(row, oom=f"{type(error).__name__}: {str(error)[:300]}"))
            state = batch = compiled = holder = None
            jax.clear_caches()
    return rows


def torch_train(sizes: Sizes, batches: Sequence[int]) -> List[Dict[str, object]]:
    import torch

    import bench_train_step
    from detr_jax.config import load_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    config = load_config("detr_r50_dc5_panoptic")
    rows = []
    for batch_size in batches:
        row = {"kind": "train", "framework": "torch", "model": "panoptic", "dtype": "float32", "batch": batch_size,
               "size": f"{sizes.train_height}x{sizes.train_width}", "config": "R50-DC5 panoptic (torch_detr)"}
        step = None
        try:
            step = bench_train_step.torch_train_step(config, batch_size, sizes.train_height, sizes.train_width,
                                                     device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            losses = []

            def call():
                losses.append(step())                     # a host sync, as the original's loop logs
                if device.type == "cuda":
                    torch.cuda.synchronize()

            row.update(timed(call, sizes.train_repeats))
            row.update(device_memory_torch(device), loss=losses[-1])
            rows.append(row)
            return rows
        except Exception as error:
            if not is_oom(error):
                raise
            rows.append(dict(row, oom=f"{type(error).__name__}: {str(error)[:300]}"))
            step = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def worker(job: Dict[str, object], sizes: Sizes) -> List[Dict[str, object]]:
    # torch's threads in the jobs that run torch only: importing it costs a job seconds of CPU
    runs_torch = job["framework"] != "jax" and not (job["framework"] == "hf" and hf_missing())
    if sizes.torch_threads and runs_torch and importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(sizes.torch_threads)
    if job["kind"] == "matmul":
        return matmul_peaks(job["framework"], sizes.matmul_n)
    if job["kind"] == "train":
        batches = job.get("batches") or sizes.train_batches
        return (jax_train if job["framework"] == "jax" else torch_train)(sizes, batches)
    if job["framework"] == "jax":
        return jax_inference(job["model"], job["dtype"], sizes)
    return torch_inference(job["framework"], job["model"], sizes)


def environment() -> Dict[str, object]:
    """Versions and the float32 flags of each framework (in the worker that has them)."""
    info: Dict[str, object] = {}
    try:
        import jax

        info.update(jax=jax.__version__, jax_backend=jax.default_backend(), jax_device=jax.devices()[0].device_kind,
                    jax_default_matmul_precision=str(jax.config.jax_default_matmul_precision))
    except Exception as error:  # noqa: BLE001 - recorded
        info["jax"] = f"unavailable: {error}"
    try:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.cuda.is_available(),
                    torch_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                    torch_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                    torch_cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    except Exception as error:  # noqa: BLE001 - recorded
        info["torch"] = f"unavailable: {error}"
    for name in ("transformers", "timm", "flax"):
        spec = importlib.util.find_spec(name)
        info[name] = __import__(name).__version__ if spec else None
    return info


# ---------------------------------------------------------------------------------------------
# Parent: plan, spawn, tabulate
# ---------------------------------------------------------------------------------------------
def plan(sizes: Sizes) -> List[Dict[str, object]]:
    """The jobs in running order: the matmul peaks, inference (jax and eager torch first, then
    Hugging Face), the train steps, torch.compile last (slowest to build, least sure to work)."""
    jobs: List[Dict[str, object]] = [{"kind": "matmul", "framework": f} for f in ("jax", "torch")]
    for model in ("panoptic", "detection"):
        jobs += [{"kind": "inference", "framework": "jax", "model": model, "dtype": d} for d in sizes.dtypes]
        jobs += [{"kind": "inference", "framework": "torch", "model": model}]
    jobs += [{"kind": "inference", "framework": "hf", "model": m} for m in ("panoptic", "detection")]
    jobs += [{"kind": "train", "framework": "jax"}, {"kind": "train", "framework": "torch"}]
    jobs += [{"kind": "inference", "framework": "torch_compile", "model": m} for m in ("panoptic", "detection")]
    return jobs


def expected_rows(job: Dict[str, object], sizes: Sizes) -> List[Dict[str, object]]:
    """The rows a job reports (for skips and failures of the whole job)."""
    base = {k: v for k, v in job.items() if k != "batches"}
    if job["kind"] == "matmul":
        return [dict(base, dtype=d) for d in ("float32", "bfloat16")]
    if job["kind"] == "train":
        return [dict(base, model="panoptic", dtype="float32")]
    compiled = job["framework"] == "torch_compile"
    dtypes = [job["dtype"]] if "dtype" in job else list(sizes.compile_dtypes if compiled else sizes.dtypes)
    batches = sizes.compile_batches if compiled else sizes.batches
    return [dict(base, dtype=d, batch=b) for d in dtypes for b in batches]


def spawn(job: Dict[str, object], args, timeout: float) -> List[Dict[str, object]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "rows.json"
        command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--job", json.dumps(job), "--json-out",
                   str(out)] + (["--smoke"] if args.smoke else [])
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",   # peak memory = what the case used
                   PYTHONPATH=os.pathsep.join([str(REPO), str(BENCH), os.environ.get("PYTHONPATH", "")]))
        try:
            proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env,
                                  timeout=None if timeout == float("inf") else timeout)
        except subprocess.TimeoutExpired:
            return [dict(r, error=f"timed out after {timeout:.0f} s") for r in expected_rows(job, args.sizes)]
        if proc.returncode != 0 or not out.exists():
            return [dict(r, error=f"exit {proc.returncode}: {proc.stderr[-1500:]}") for r in expected_rows(job, args.sizes)]
        return json.loads(out.read_text())


def fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def status(row: Dict[str, object]) -> Optional[str]:
    """Why a row has no timing (skipped, error, OOM), or None."""
    for key in ("skipped", "error", "oom"):
        if row.get(key):
            return f"{key}: {str(row[key]).splitlines()[0][:120]}"
    return None


def tables(rows: List[Dict[str, object]], sizes: Sizes, env: Dict[str, object]) -> str:
    peaks = {}
    for r in rows:
        if r["kind"] == "matmul" and r.get("tflops"):
            peaks[r["dtype"]] = max(peaks.get(r["dtype"], 0.0), r["tflops"])
    lines = [f"device: jax {env.get('jax_device')} ({env.get('jax_backend')}), torch {env.get('torch_device')}; "
             f"jax {env.get('jax')}, torch {env.get('torch')}, transformers {env.get('transformers')}, "
             f"timm {env.get('timm')}",
             "matmul peak measured here (TFLOP/s, n=%d): " % sizes.matmul_n + ", ".join(
                 f"{r['framework']} {r['dtype']} {r['tflops']:.3g}" for r in rows if r["kind"] == "matmul" and r.get("tflops"))]
    device = str(env.get("torch_device") or env.get("jax_device") or "")
    sheet = next((v for k, v in DATASHEET_TFLOPS.items() if k in device), None)
    if sheet:
        lines.append(f"datasheet dense peak of the {device}: bf16 {sheet[0]}, tf32 {sheet[1]}, fp32 {sheet[2]} TFLOP/s")
    lines.append("")

    def pct(r):
        peak = peaks.get(r["dtype"])
        if not (r.get("median_s") and r.get("gflops") and peak):
            return None
        return 100 * r["gflops"] / 1e3 / r["median_s"] / peak

    by = {(r["kind"], r["framework"], r.get("model"), r["dtype"], r.get("batch")): r for r in rows if r["kind"] != "matmul"}
    lines += ["## Inference (images/s; ratios: jax images/s over the other's)", "",
              "| model | dtype | batch | framework | images/s | median ms | compile s | peak memory MB | GFLOPs "
              "| % matmul peak | jax / this | note |", "|" + " --- |" * 12]
    for r in rows:
        if r["kind"] != "inference":
            continue
        ips = r["batch"] / r["median_s"] if r.get("median_s") else None
        jax_r = by.get(("inference", "jax", r["model"], r["dtype"], r["batch"]), {})
        flops = r.get("gflops") or jax_r.get("gflops")
        rel = (jax_r["median_s"] and r["median_s"] / jax_r["median_s"]) if jax_r.get("median_s") and r.get("median_s") else None
        note = status(r) or ""
        if r["framework"] == "jax" and r["dtype"] == "bfloat16":
            f32 = by.get(("inference", "jax", r["model"], "float32", r["batch"]), {})
            if f32.get("median_s") and r.get("median_s"):
                note = f"bf16 / our f32: {f32['median_s'] / r['median_s']:.2f}x"
        memory = f"{fmt(r.get('peak_memory_mb'), '.0f')}{' RSS' if r.get('memory_kind') == 'RSS' else ''}"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['framework']} | {fmt(ips, '.2f')} "
                     f"| {fmt(r.get('median_s') and 1e3 * r['median_s'], '.1f')} | {fmt(r.get('compile_s'))} | {memory} "
                     f"| {fmt(flops, '.4g')} | {fmt(pct(dict(r, gflops=flops)))} "
                     f"| {'' if r['framework'] == 'jax' else fmt(rel, '.2f')} | {note} |")
    lines += ["", "## Train step, R50-DC5 panoptic with matching, largest batch that fits", "",
              "| framework | batch | size | images/s | median s | compile s | peak memory MB | GFLOPs | % matmul peak "
              "| jax / this | note |", "|" + " --- |" * 11]
    train = [r for r in rows if r["kind"] == "train"]
    jax_fit = next((r for r in train if r["framework"] == "jax" and r.get("median_s")), {})
    for r in train:
        ips = r["batch"] / r["median_s"] if r.get("median_s") else None
        flops = r.get("gflops") or (jax_fit.get("gflops") if jax_fit.get("batch") == r.get("batch") else None)
        rel = ((jax_fit["batch"] / jax_fit["median_s"]) / ips) if ips and jax_fit.get("median_s") and r["framework"] != "jax" else None
        memory = f"{fmt(r.get('peak_memory_mb'), '.0f')}{' RSS' if r.get('memory_kind') == 'RSS' else ''}"
        lines.append(f"| {r['framework']} | {r.get('batch', '-')} | {r.get('size', '-')} | {fmt(ips, '.2f')} "
                     f"| {fmt(r.get('median_s'), '.3f')} | {fmt(r.get('compile_s'))} | {memory} | {fmt(flops, '.4g')} "
                     f"| {fmt(pct(dict(r, gflops=flops)))} | {fmt(rel, '.2f')} | {status(r) or r.get('config', '')} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every case at a tiny size (see above)")
    parser.add_argument("--out", default=str(BENCH / "results"), help="folder for accelerator.md and accelerator.json")
    parser.add_argument("--budget", type=float, help="seconds for the whole run, later cases skipped (default "
                        "470; --smoke: none)")
    parser.add_argument("--repeats", type=int, help="timed calls per inference case")
    parser.add_argument("--train-batches", help="comma-separated batch sizes to try, largest first")
    parser.add_argument("--compile-batches", help="comma-separated batches for torch.compile")
    parser.add_argument("--compile-dtypes", help="comma-separated dtypes for torch.compile (default float32)")
    parser.add_argument("--only", help="comma-separated jobs to run, as KIND:FRAMEWORK prefixes (e.g. "
                        "'train,inference:torch_compile'); default: all")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else Sizes()
    overrides = {}
    if args.repeats:
        overrides["repeats"] = args.repeats
    if args.train_batches:
        overrides["train_batches"] = tuple(int(b) for b in args.train_batches.split(","))
    if args.compile_batches:
        overrides["compile_batches"] = tuple(int(b) for b in args.compile_batches.split(","))
    if args.compile_dtypes:
        overrides["compile_dtypes"] = tuple(args.compile_dtypes.split(","))
    args.sizes = sizes = dataclasses.replace(sizes, **overrides)
    if args.budget is None:
        args.budget = float("inf") if args.smoke else 470.0

    if args.job:
        job = json.loads(args.job)
        rows = worker(job, sizes)
        if job["kind"] == "matmul":
            rows.append(dict(kind="environment", framework=job["framework"], dtype="-", **environment()))
        pathlib.Path(args.json_out).write_text(json.dumps(rows, indent=1))
        return 0

    start = time.perf_counter()
    print(f"bench/accelerator.py{' --smoke' if args.smoke else ''}: budget {args.budget:.0f} s", flush=True)
    rows: List[Dict[str, object]] = []
    only = [p for p in (args.only or "").split(",") if p]
    for job in plan(sizes):
        if only and not any(f"{job['kind']}:{job['framework']}".startswith(p) for p in only) and job["kind"] != "matmul":
            continue
        left = args.budget - (time.perf_counter() - start)
        if job["kind"] == "train" and job["framework"] == "torch":   # start where jax fitted
            fit = next((r["batch"] for r in rows if r["kind"] == "train" and r.get("median_s")), None)
            if fit is not None:
                job = dict(job, batches=[b for b in sizes.train_batches if b <= fit])
        if left < 5:
            new = [dict(r, skipped=f"the run's time budget ({args.budget:.0f} s) was spent")
                   for r in expected_rows(job, sizes)]
        else:
            t = time.perf_counter()
            new = spawn(job, args, timeout=left)
            print(f"  {job['kind']:9s} {job['framework']:13s} {job.get('model', ''):9s} {job.get('dtype', '')}: "
                  f"{time.perf_counter() - t:.0f} s; " + "; ".join(
                      (status(r) or (f"b{r.get('batch')} {1e3 * r['median_s']:.1f} ms" if r.get("median_s") else
                                     f"{r.get('dtype')} {r.get('tflops', 0):.1f} TFLOP/s"))
                      for r in new if r["kind"] != "environment"), flush=True)
        rows += new
    env = {}
    for r in rows:
        if r["kind"] == "environment":
            env.update({k: v for k, v in r.items() if k not in ("kind", "framework", "dtype") and v is not None
                        and not (isinstance(v, str) and v.startswith("unavailable") and k in env)})
    rows = [r for r in rows if r["kind"] != "environment"]
    text = tables(rows, sizes, env)
    elapsed = time.perf_counter() - start
    header = (f"# bench/accelerator.py{' --smoke (tiny sizes; detr-jax side detr_tiny-sized: compares nothing)' if args.smoke else ''}\n\n"
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed:.0f} s in all; inference at "
              f"{sizes.height}x{sizes.width}, train at {sizes.train_height}x{sizes.train_width}\n")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accelerator.md").write_text(header + "\n" + text + "\n")
    (out / "accelerator.json").write_text(json.dumps(
        {"smoke": args.smoke, "sizes": dataclasses.asdict(sizes), "elapsed_s": elapsed, "environment": env,
         "rows": rows}, indent=1))
    print("\n" + header + "\n" + text + f"\n\nwritten: {out / 'accelerator.md'}, {out / 'accelerator.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
