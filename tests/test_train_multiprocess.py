"""Training across devices and processes, and resuming after a real kill.

* pmap on 2 local CPU devices gives the loss and parameters of 1 device on the same global batch;
* 2 processes on 127.0.0.1 (gloo CPU collectives, 1 device each, each reading its own shard, with
  images of different sizes on the two hosts) train in lockstep with the scipy matcher's host
  callback, and end with identical parameters;
* a run SIGKILLed after a checkpoint and resumed ends exactly where an uninterrupted run ends.

Device counts and `jax.distributed` must be set before JAX starts, so every run is a fresh
interpreter.  Each compiles the tiny model's train step (about a minute on a busy 2-core CPU).
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, with_test_xla_flags

pytestmark = pytest.mark.slow
TIMEOUT = 540

WORKER = r"""
import dataclasses, json, sys, time
args = json.loads(sys.argv[1])
if args.get("coordinator"):
    from detr_jax.train import initialize_distributed
    initialize_distributed(args["coordinator"], args["num_processes"], args["process_id"])
import jax, numpy as np
from flax import traverse_util
from detr_jax.config import TrainConfig, load_config
from detr_jax.data.coco import CocoPanoptic
from detr_jax.train import train

cfg = load_config("detr_tiny")
cfg = dataclasses.replace(
    cfg, model=dataclasses.replace(cfg.model, dropout=args["dropout"]),
    loss=dataclasses.replace(cfg.loss, matcher=args["matcher"]),
    data=dataclasses.replace(cfg.data, train_scales=(64,), train_max_size=96, crop_prob=0.0, hflip_prob=0.5),
    train=TrainConfig(batch_size=args["batch_size"], max_steps=args["steps"], save_every=2, log_every=2,
                      keep_checkpoints=10, num_workers=0, lr=1e-3, lr_backbone=1e-4))
sleep = args.get("sleep", 0)
eval_fn = (lambda variables, step: time.sleep(sleep)) if sleep else None
result = train(cfg, args["workdir"], CocoPanoptic(args["data"], "train2017"), eval_fn=eval_fn,
               eval_every=1 if sleep else None, progress=False)
state = result["state"]
arrays = {"step": np.asarray(state.step)}
arrays.update({"params/" + k: v for k, v in traverse_util.flatten_dict(state.params, sep="/").items()})
arrays.update({"opt/%d" % i: np.asarray(x) for i, x in enumerate(jax.tree.leaves(state.opt_state))})
np.savez(args["out"], **arrays)
print("RESULT" + json.dumps({"metrics": result["metrics"], "process": jax.process_index(),
                             "devices": jax.device_count()}), flush=True)
"""

PMAP_CHECK = r"""
import dataclasses, json, sys
import jax, numpy as np
from flax import traverse_util
from detr_jax import optim
from detr_jax.config import TrainConfig, load_config
from detr_jax.data.coco import CocoPanoptic
from detr_jax.data.loader import Loader
from detr_jax.data.transforms import TrainTransform
from detr_jax.models.detr import DETR, init_variables
from detr_jax.train import AXIS, make_parallel_train_step, make_train_step, stage_configs
from detr_jax.train_state import create_train_state

assert jax.local_device_count() == 2, jax.devices()
cfg = load_config("detr_tiny")
cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.0),   # dropout differs per device
                          data=dataclasses.replace(cfg.data, train_scales=(64,), train_max_size=96, crop_prob=0.0),
                          train=TrainConfig(batch_size=2))
model_config, loss_config = stage_configs(cfg)
variables = jax.tree.map(np.asarray, init_variables(model_config, jax.random.PRNGKey(0)))
optimizer = optim.make_optimizer(variables["params"], cfg.train, steps_per_epoch=1)
state = create_train_state(variables, optimizer)
step = make_train_step(DETR(model_config), loss_config, optimizer, optim.lr_schedule(1e-4, cfg.train, 1),
                       optim.trainable_mask(state.params, cfg.train))
batch = next(Loader(CocoPanoptic(sys.argv[1], "train2017"), 2, TrainTransform(cfg.data), config=cfg.data).iterate())
keys = ("pixel_values", "pixel_mask", "labels", "boxes", "valid", "masks")
rng = np.asarray(jax.random.PRNGKey(1))
results = {}
for n, fn in ((1, jax.pmap(step, axis_name=AXIS, devices=jax.local_devices()[:1])), (2, make_parallel_train_step(step))):
    stack = lambda x: np.broadcast_to(np.asarray(x)[None], (n,) + np.shape(x))
    shards = {k: batch[k].reshape((n, 2 // n) + batch[k].shape[1:]) for k in keys}
    new_state, metrics = fn(jax.tree.map(stack, state), shards, stack(rng))
    results[n] = (jax.tree.map(lambda x: np.asarray(x)[0], new_state.params),
                  {k: np.asarray(v) for k, v in metrics.items()})
(p1, m1), (p2, m2) = results[1], results[2]
flat1, flat2 = traverse_util.flatten_dict(p1, sep="/"), traverse_util.flatten_dict(p2, sep="/")
print("REPORT" + json.dumps({
    "devices_agree": all(float(np.ptp(v)) == 0 for v in m2.values()),
    "metric_rel": {k: abs(float(m2[k][0]) - float(m1[k][0])) / max(abs(float(m1[k][0])), 1e-6) for k in m1},
    "param_abs": max(float(np.abs(flat1[k] - flat2[k]).max()) for k in flat1),
    "param_update": max(float(np.abs(flat1[k] - traverse_util.flatten_dict(state.params, sep="/")[k]).max()) for k in flat1),
    "loss": float(m1["loss"][0]), "num_targets": int(batch["valid"].sum())}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(tmp_path: pathlib.Path, devices: int = 1, cache: bool = False) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=with_test_xla_flags(f"--xla_force_host_platform_device_count={devices}"))
    # programs without host callbacks (the "device" matcher) compile once for all runs: in the
    # suite's cache when it has one (conftest.py), which also holds the tiny model's init that the
    # earlier tests compiled, else in one of the test's own
    if cache and "JAX_COMPILATION_CACHE_DIR" not in env:
        env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def start_worker(tmp_path, env, **args) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    log = open(tmp_path / f"log_{pathlib.Path(args['out']).stem}.txt", "w")
    return subprocess.Popen([sys.executable, str(script), json.dumps(args)], env=env, cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, tmp_path, name: str, timeout: float = TIMEOUT) -> dict:
    """Wait for a worker; on failure or timeout, fail with the tail of its output."""
    log_file = tmp_path / f"log_{name}.txt"
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"worker {name} timed out after {timeout}s:\n{log_file.read_text()[-4000:]}")
    output = log_file.read_text()
    assert proc.returncode == 0, f"worker {name} exited with {proc.returncode}:\n{output[-4000:]}"
    return json.loads(output.split("RESULT", 1)[1].splitlines()[0])


def load_run(path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from detr_jax.data.synthetic import ensure_synthetic

    # seed 0 draws 64x64 for image 1 and 64x96 for image 2: the two hosts' buckets differ
    return str(ensure_synthetic(tmp_path_factory.mktemp("synthetic"), num_train=2, num_val=0,
                                image_size=[(64, 64), (64, 96)], seed=0))


def test_pmap_on_two_devices_equals_one_device_for_the_same_global_batch(tmp_path, data_root):
    script = tmp_path / "check.py"
    script.write_text(PMAP_CHECK)
    proc = subprocess.run([sys.executable, str(script), data_root], env=environment(tmp_path, devices=2),
                          cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    assert report["devices_agree"], report
    assert max(report["metric_rel"].values()) < 1e-5, report
    assert report["param_update"] > 1e-5                  # the step did move the parameters ...
    assert report["param_abs"] < 1e-6, report             # ... identically on 1 and 2 devices


def test_two_processes_train_in_lockstep_with_the_host_matcher(tmp_path, data_root):
    port = free_port()
    procs = [start_worker(tmp_path, environment(tmp_path), coordinator=f"127.0.0.1:{port}", num_processes=2,
                          process_id=i, data=data_root, workdir=str(tmp_path / "run"), out=str(tmp_path / f"p{i}.npz"),
                          batch_size=2, steps=2, dropout=0.1, matcher="scipy") for i in range(2)]
    try:
        results = [finish(p, tmp_path, f"p{i}") for i, p in enumerate(procs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [r["process"] for r in results] == [0, 1] and all(r["devices"] == 2 for r in results)
    runs = [load_run(tmp_path / f"p{i}.npz") for i in range(2)]
    assert int(runs[0]["step"]) == 2
    for key in runs[0]:
        np.testing.assert_array_equal(runs[0][key], runs[1][key], err_msg=key)
    losses = [{k: v for k, v in r["metrics"].items() if k != "images_per_s"} for r in results]
    assert np.isfinite(losses[0]["loss"]) and losses[0] == losses[1]
    assert (tmp_path / "run" / "model" / "config.json").exists()
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


def test_resume_after_sigkill_ends_where_an_uninterrupted_run_ends(tmp_path, data_root):
    env, steps = environment(tmp_path, cache=True), 8
    common = dict(data=data_root, batch_size=2, steps=steps, dropout=0.1, matcher="device")
    workdir = tmp_path / "killed"
    proc = start_worker(tmp_path, env, workdir=str(workdir), out=str(tmp_path / "killed.npz"), sleep=1.0, **common)
    deadline, killed_after = time.time() + TIMEOUT, None
    while time.time() < deadline and proc.poll() is None:
        saved = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
        if saved and max(saved) >= 4:
            proc.send_signal(signal.SIGKILL)
            killed_after = max(saved)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    output = (tmp_path / "log_killed.txt").read_text()
    assert killed_after is not None and proc.returncode == -signal.SIGKILL, output[-4000:]
    assert killed_after < steps and not (workdir / "model").exists()

    finish(start_worker(tmp_path, env, workdir=str(workdir), out=str(tmp_path / "resumed.npz"), **common),
           tmp_path, "resumed")
    finish(start_worker(tmp_path, env, workdir=str(tmp_path / "straight"), out=str(tmp_path / "straight.npz"),
                        **common), tmp_path, "straight")
    resumed, straight = load_run(tmp_path / "resumed.npz"), load_run(tmp_path / "straight.npz")
    assert int(resumed["step"]) == int(straight["step"]) == steps
    assert set(resumed) == set(straight)
    worst = max(float(np.abs(resumed[k].astype(np.float64) - straight[k]).max()) for k in straight)
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst}"
    logged = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6, 8], logged
