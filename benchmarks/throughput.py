"""Throughput and overhead of the training stack, measured side by side in one run.

Prints samples/s of the pretrain and virface stages as
  1. a bare PyTorch loop of the same backbone and head (no loader, no logging),
  2. the core stage loop (``run_stage``) in one process,
  3. the stage loop as a one-worker Tune trial (in the trial's process),
  4. the stage loop as a Tune trial with 1 and with 2 workers (DDP ranks as Ray actors, gloo on CPU),
and the fixed cost of a trial that does (almost) no training: one step, no evaluation.

    python benchmarks/throughput.py            # about 4 minutes on 2 cores
    python benchmarks/throughput.py --quick    # about 2 minutes; used by the tests
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from virface.config import TrainConfig  # noqa: E402

SYNTHETIC = {"n_labeled_ids": 100, "images_per_labeled_id": 10, "n_unlabeled_ids": 300,
             "n_val_ids": 20, "val_pairs": 100}


def stage_config(method: str, steps: int, pretrained: str | None = None, **kw) -> TrainConfig:
    # Two epochs: the second one's samples/s is compared, so no figure includes first-step costs.
    return TrainConfig(method=method, arch="mobilefacenet_s", label_batch_size=64, unlabel_batch_size=64,
                       steps_per_epoch=steps, max_epoch=2, eval=False, tensorboard=False, device="cpu",
                       synthetic=SYNTHETIC, pretrained_file=pretrained, **kw)


def bare_loop(config: TrainConfig, steps: int) -> float:
    """samples/s of a hand-written pretrain loop over the same backbone, head and optimiser."""
    from virface.backbones import build_backbone
    from virface.data.images import normalize_pixels
    from virface.heads import ArcFaceHead

    backbone = build_backbone(config.arch, feat_len=512, input_size=32)
    head = ArcFaceHead(100, 512)
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.01, momentum=0.9,
                          weight_decay=1e-3)
    images = torch.randint(0, 256, (config.label_batch_size, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 100, (config.label_batch_size,))
    backbone.train()

    def step():
        x = normalize_pixels(images)
        loss = torch.nn.functional.cross_entropy(head(backbone(x), labels), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * config.label_batch_size / (time.perf_counter() - start)


def core_loop(config: TrainConfig, work: str) -> float:
    from virface.stages import run_stage

    result = run_stage(config, os.path.join(work, f"core-{config.method}"))
    return result.history[-1]["samples_per_s"]


def tune_trial(config: TrainConfig, storage: str, workers: int, name: str) -> tuple[float, float]:
    """(samples/s reported by the trial, wall seconds of the whole Tune run)."""
    from ray import tune

    from virface.search.space import ResourcesSpec
    from virface.search.trial import TrialSetup, run_trial, trial_resources

    setup = TrialSetup(stage=config.method, base_config=config.to_dict(),
                       upstream_checkpoint=config.pretrained_file,
                       tb_root=os.path.join(storage, name, "tb"), train_storage=os.path.join(storage, name),
                       metric="loss", mode="min", resources=ResourcesSpec(workers=workers))
    base = {k: v for k, v in config.to_dict().items() if k != "pretrained_file"}
    setup.base_config = base
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_resources(setup))
    start = time.perf_counter()
    results = tune.Tuner(trainable, param_space={}, tune_config=tune.TuneConfig(num_samples=1),
                         run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0)).fit()
    wall = time.perf_counter() - start
    result = results[0]
    if result.error:
        raise RuntimeError(f"{name}: {result.error}")
    return result.metrics["samples_per_s"], wall


def trial_overhead(storage: str, workers: int, n_trials: int, name: str) -> float:
    """Seconds per trial of trials that train one step, evaluate nothing and checkpoint once."""
    from ray import tune

    from virface.search.space import ResourcesSpec
    from virface.search.trial import TrialSetup, run_trial, trial_resources

    config = stage_config("pretrain", steps=1).replace(label_batch_size=8, max_epoch=1)
    setup = TrialSetup(stage="pretrain", base_config=config.to_dict(), upstream_checkpoint=None,
                       tb_root=os.path.join(storage, name, "tb"), train_storage=os.path.join(storage, name),
                       metric="loss", mode="min", resources=ResourcesSpec(workers=workers))
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_resources(setup))
    start = time.perf_counter()
    tune.Tuner(trainable, param_space={"seed": tune.grid_search(list(range(n_trials)))},
               tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
               run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0)).fit()
    return (time.perf_counter() - start) / n_trials


def noop_trial_overhead(storage: str, n_trials: int) -> float:
    """Seconds per trial of a Tune function trial that only reports once (Tune's own floor)."""
    from ray import tune

    def noop(config):
        tune.report({"loss": 0.0})

    start = time.perf_counter()
    tune.Tuner(tune.with_resources(noop, {"cpu": 1}),
               param_space={"i": tune.grid_search(list(range(n_trials)))},
               tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
               run_config=tune.RunConfig(name="noop", storage_path=storage, verbose=0)).fit()
    return (time.perf_counter() - start) / n_trials


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    steps = 8 if args.quick else 100
    n_trials = 3 if args.quick else 6
    torch.set_num_threads(1)        # one CPU per worker, as Ray gives each trial and rank
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as work:
        import ray

        from virface.stages import run_stage

        os.environ.setdefault("VIRFACE_CACHE_DIR", os.path.join(work, "cache"))
        pre = run_stage(stage_config("pretrain", 3).replace(max_epoch=1),
                        os.path.join(work, "upstream-pre")).last_checkpoint
        gen = run_stage(stage_config("generator", 3, pre).replace(max_epoch=1),
                        os.path.join(work, "upstream-gen")).last_checkpoint
        configs = {"pretrain": stage_config("pretrain", steps),
                   "virface": stage_config("virface", steps, gen)}
        figures["bare_pretrain"] = bare_loop(configs["pretrain"], steps)
        for stage, config in configs.items():
            figures[f"core_{stage}"] = core_loop(config, work)
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", log_to_driver=False)
        try:
            storage = os.path.join(work, "ray")
            for stage, config in configs.items():
                for workers in (1, 2):
                    sps, _ = tune_trial(config, storage, workers, f"{stage}_w{workers}")
                    figures[f"ray_{stage}_w{workers}"] = sps
            figures["overhead_noop_tune_s"] = noop_trial_overhead(storage, n_trials)
            figures["overhead_trial_w1_s"] = trial_overhead(storage, 1, n_trials, "overhead_w1")
            figures["overhead_trial_w2_s"] = trial_overhead(storage, 2, max(2, n_trials // 2), "overhead_w2")
        finally:
            ray.shutdown()

    print(f"\nthroughput (samples/s, 1 CPU thread per process; {os.cpu_count()} cores)")
    print(f"  pretrain  bare loop            {figures['bare_pretrain']:8.1f}")
    for stage in ("pretrain", "virface"):
        core = figures[f"core_{stage}"]
        print(f"  {stage:<9} core loop            {core:8.1f}")
        for w in (1, 2):
            v = figures[f"ray_{stage}_w{w}"]
            print(f"  {stage:<9} Ray, {w} worker(s)      {v:8.1f}   ratio to core loop {v / core:.3f}")
    print(f"  pretrain  core / bare ratio     {figures['core_pretrain'] / figures['bare_pretrain']:.3f}")
    print("per-trial fixed cost (s/trial, sequential trials, actors reused)")
    print(f"  Tune no-op function trial      {figures['overhead_noop_tune_s']:.2f}")
    print(f"  one-step stage trial, 1 worker {figures['overhead_trial_w1_s']:.2f}")
    print(f"  one-step stage trial, 2 workers {figures['overhead_trial_w2_s']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
